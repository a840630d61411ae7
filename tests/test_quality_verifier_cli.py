"""``llmcache-cli eval --rerank --verifier`` and ``tune --train-verifier`` on hand-written labelled
pairs (real embedders), and a trained verifier applied to a real node process through
``--apply`` (a replicated ``ConfigSet``), then deciding its lookups over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmcache.client import CacheClient
from llmcache.client.cli import main
from llmcache.node import verifier as learned
from llmcache.node.adaptive import NO_SEMANTIC_HITS
from llmcache.node.embed import bge
from tests.node_process import NodeProcess
from tests.test_quality_cli import write

pytestmark = pytest.mark.skipif(not bge.available(), reason="pip install -e '.[rerank]'")

# Look-alike topics: each pair of neighbours differs in one content word.
TOPICS = [
    ("learn java", "learn python"),
    ("bake bread at home", "bake a cake at home"),
    ("lose weight fast", "gain muscle fast"),
    ("fix a flat bike tire", "fix a flat car tire"),
    ("grow tomatoes indoors", "grow potatoes indoors"),
    ("clean a leather sofa", "clean a fabric sofa"),
    ("train a puppy to sit", "train a cat to sit"),
    ("learn to play guitar", "learn to play piano"),
    ("write a cover letter", "write a resignation letter"),
    ("remove a red wine stain", "remove a coffee stain"),
    ("improve my english vocabulary", "improve my french vocabulary"),
    ("start a vegetable garden", "start a flower garden"),
]


def rows() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for a, b in TOPICS:
        for x in (a, b):
            out.append({"text_a": f"how do i {x}", "text_b": f"how can i {x}", "label": 1})
            out.append(
                {"text_a": f"what is the best way to {x}", "text_b": f"how to {x}", "label": 1}
            )
        out.append({"text_a": f"how do i {a}", "text_b": f"how do i {b}", "label": 0})
        out.append({"text_a": f"how can i {b}", "text_b": f"how can i {a}", "label": 0})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("v") / "pairs.jsonl", rows())


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_eval_adds_rerank_and_cross_validated_verifier_curves(data: Path) -> None:
    code, out, err = run(
        "eval", "--data", str(data), "--rerank", "--verifier", "--folds", "3", "--gate", "0.5",
        "--latency", "4", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    at = result["at_recall"]
    for curve in ("guards +rerank", "guards +verifier", "guards +rerank +verifier"):
        assert curve in at
    # The engine's re-ranking cosines are real scores: they separate these look-alikes.
    assert result["roc_auc_rerank"] >= 0.95
    assert at["guards +rerank"]["0.5"] >= at["no guards"]["0.5"]
    folds = result["verifier"]["guards +rerank +verifier"]["precision_at_recall_0.5_per_fold"]
    assert len(folds) == 3
    assert set(result["latency"]) == {"guards", "guards +rerank"}


def test_eval_rerank_without_the_model_is_a_usage_error(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(bge.ENV_DIR, str(tmp_path))  # an empty directory
    code, _, err = run("eval", "--data", str(data), "--rerank")
    assert code == 2 and "--rerank" in err


def test_tune_trains_a_verifier_per_namespace(data: Path) -> None:
    code, out, err = run(
        "tune", "--data", str(data), "--train-verifier", "--target-precision", "0.9",
        "--gate", "0.5", "--folds", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    found = json.loads(out)["namespaces"]["default"]
    settings = found["settings"]
    assert settings["threshold"] == 0.5 and settings["rerank"] is False
    verifier = learned.Verifier.loads(settings["verifier"])
    assert not verifier.needs_rerank
    assert found["held_out"]["precision"] >= 0.9


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(Path(tmp_path_factory.mktemp("verifier-node")))
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_a_tuned_verifier_is_applied_to_the_cluster_and_decides_its_hits(
    data: Path, node: NodeProcess
) -> None:
    code, out, err = run(
        "tune", "--data", str(data), "--train-verifier", "--rerank", "--target-precision", "0.9",
        "--gate", "0.5", "--folds", "3", "--apply", "--tenant", "default", "--url", node.url,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["namespaces"]["default"]["applied"] is True
    with CacheClient([node.url]) as client:
        stored = client.set_settings("default", {}, namespace="default")
        assert learned.Verifier.loads(stored["config"]["verifier"]).needs_rerank
        client.store("how do i repair a leaking faucet", "Turn off the water first.")
        same = client.lookup("how can i repair a leaking faucet")
        assert same.status == "SEMANTIC_HIT"
        other = client.lookup("how do i repair a leaking roof")
        # Above the threshold (0.5) and past the guards: the verifier said no.
        assert other.status == "MISS" and other.similarity is not None
        assert other.similarity >= 0.5


def test_eval_streams_each_fold_with_a_verifier_trained_on_the_others(data: Path) -> None:
    code, out, err = run(
        "eval", "--data", str(data), "--json", "--adaptive-delta", "0.3",
        "--adaptive-verifier", "--folds", "3",
    )  # fmt: skip
    assert code == 0, err
    adaptive = json.loads(out)["adaptive"]
    assert adaptive["verifier_folds"] == 3 and len(adaptive["final_cuts"]) == 3
    assert adaptive["lookups"] == len(rows())
    # Every hit and every probe was labelled, each under the verifier's probability.
    assert adaptive["labels"] == adaptive["hits"] + adaptive["probes"]
    assert all(0.0 <= cut <= NO_SEMANTIC_HITS for cut in adaptive["final_cuts"])
