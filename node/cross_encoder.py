"""Tenant cross-encoders: ONNX models that read a (query, cached) pair together and score it.

A bi-encoder compares two vectors made apart; a cross-encoder attends across both texts at once,
which is what tells "How did God create the universe?" from "Why did …". None ships with the
package (no duplicate-question cross-encoder with its weights on PyPI was found, and the only
labelled data here, QQP, is non-commercial): a tenant fine-tunes one on its own labelled pairs
(``tests/bench/train_cross_encoder.py``, torch) and exports it as a **model directory** holding
``model.onnx`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``; output ``logits``
of shape ``[batch, 1]``, or ``[batch, 2]`` read as the second logit minus the first) and its
``tokenizer.json``. Its score becomes the verifier feature ``cross_encoder``
(``node/verifier.py``); a verifier that uses it names the model by :func:`digest`.

Distribution: every node reads models from its ``models_dir`` (config; default
``<data_dir>/models``), one subdirectory per model named by the digest's hex part, put there
out of band (``llmcache-cli models install``, a volume, an image layer). A node verifies the
digest when it first loads a model and refuses a mismatch, so nodes that serve a namespace all
score with the same weights. A node without the model answers that namespace's lookups with
:class:`CrossEncoderMissing` (HTTP 503) rather than serve an unverified hit.

Determinism: each ordered pair runs through the model alone (batch of one), so its score is a
function of the two texts only, never of what else was in a batch; the score is the mean of
the (query, cached) and (cached, query) logits, so it does not depend on which text was cached.
Thread safety: :meth:`CrossEncoder.score` may be called from any thread (onnxruntime sessions
are thread-safe for ``run``); :class:`CrossEncoders` loads each model once under a lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tokenizers

from llmcache.node.embed.base import utf8_safe
from llmcache.node.embed.minilm import cpu_session
from llmcache.node.errors import CrossEncoderMissing

FILES = ("model.onnx", "tokenizer.json")
"""What a model directory holds; the digest covers both."""
MAX_PAIR_PIECES = 256
"""Word pieces a pair is cut to, special ones included (longest text first, the tokenizer's
``longest_first``): bounds a lookup's cost for long prompts; QQP pairs average ~30 pieces."""


def digest(model_dir: Path) -> str:
    """``sha256:<hex>`` of a model directory: sha256 over each of :data:`FILES`' name and own
    sha256, in that order. Raises :class:`CrossEncoderMissing` when a file is missing."""
    outer = hashlib.sha256()
    for name in FILES:
        path = Path(model_dir) / name
        inner = hashlib.sha256()
        try:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    inner.update(chunk)
        except OSError as exc:
            raise CrossEncoderMissing(
                f"cross-encoder file {path} is not readable: {exc.strerror}",
                field="cross_encoder",
            ) from None
        outer.update(name.encode() + b"\0" + inner.digest())
    return "sha256:" + outer.hexdigest()


def install(model_dir: Path, models_dir: Path) -> str:
    """Copy a model directory into ``models_dir`` under its digest (atomically: a half-copied
    model is never visible); returns the digest. Installing an installed model is a no-op."""
    found = digest(model_dir)
    target = Path(models_dir) / found.removeprefix("sha256:")
    if target.is_dir():
        return found
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models_dir))
    try:
        for name in FILES:
            shutil.copyfile(Path(model_dir) / name, staging / name)
        if digest(staging) != found:
            raise CrossEncoderMissing(
                f"{model_dir} changed while it was copied", field="cross_encoder"
            )
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return found


class CrossEncoder:
    """One loaded model directory. ``score`` is the model's logit for the pair, averaged over
    both orders (higher: more likely the same question)."""

    def __init__(self, model_dir: Path, threads: int | None = 1) -> None:
        self.digest = digest(model_dir)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_PAIR_PIECES, strategy="longest_first")
        # One thread by default: a lookup scores a few short pairs, and the server runs many
        # lookups at once.
        self.session = cpu_session(Path(model_dir) / "model.onnx", threads)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def logit(self, first: str, second: str) -> float:
        """The model's logit for the ordered pair (``first``, ``second``), run alone."""
        enc = self.tokenizer.encode(utf8_safe(first), utf8_safe(second))
        feed = {
            "input_ids": np.array([enc.ids], np.int64),
            "attention_mask": np.array([enc.attention_mask], np.int64),
            "token_type_ids": np.array([enc.type_ids], np.int64),
        }
        out = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        row = np.asarray(out, np.float64).reshape(-1)
        return float(row[0] if len(row) == 1 else row[1] - row[0])

    def score(self, query: str, cached: str) -> float:
        return (self.logit(query, cached) + self.logit(cached, query)) / 2.0


RETRY_BROKEN_S = 10.0
"""A model directory that failed to load (wrong digest, not ONNX) is tried again after this
long, not at every lookup: checking costs a hash of ~90 MB."""


class CrossEncoders:
    """The models of one node's ``models_dir``, loaded at first use and kept (one session per
    model per process; a MiniLM-L6 cross-encoder takes ~90 MB fp32)."""

    def __init__(self, models_dir: Path | None) -> None:
        self.models_dir = models_dir
        self._loaded: dict[str, CrossEncoder] = {}
        self._broken: dict[str, tuple[float, CrossEncoderMissing]] = {}
        self._lock = threading.Lock()

    def get(self, wanted: str) -> CrossEncoder:
        """The model with digest ``wanted``; raises :class:`CrossEncoderMissing`."""
        model = self._loaded.get(wanted)
        if model is not None:
            return model
        with self._lock:
            model = self._loaded.get(wanted)
            if model is None:
                model = self._load(wanted)
                self._loaded[wanted] = model
        return model

    def _load(self, wanted: str) -> CrossEncoder:
        if self.models_dir is None:
            raise CrossEncoderMissing(
                f"the verifier needs cross-encoder {wanted}, and this node has no models_dir",
                field="cross_encoder",
            )
        where = self.models_dir / wanted.removeprefix("sha256:")
        if not where.is_dir():
            raise CrossEncoderMissing(
                f"the verifier needs cross-encoder {wanted}, which is not installed in "
                f"{self.models_dir} on this node (llmcache-cli models install)",
                field="cross_encoder",
            )
        failed_at, error = self._broken.get(wanted, (-RETRY_BROKEN_S, None))
        if error is not None and time.monotonic() - failed_at < RETRY_BROKEN_S:
            raise error
        try:
            model = CrossEncoder(where)
            if model.digest != wanted:
                raise CrossEncoderMissing(
                    f"{where} holds files with digest {model.digest}, not {wanted}",
                    field="cross_encoder",
                )
        except CrossEncoderMissing as exc:
            self._broken[wanted] = (time.monotonic(), exc)
            raise
        except Exception as exc:  # onnxruntime and tokenizers raise their own types
            broken = CrossEncoderMissing(
                f"cross-encoder {wanted} in {where} cannot be loaded: {exc}", field="cross_encoder"
            )
            self._broken[wanted] = (time.monotonic(), broken)
            raise broken from None
        self._broken.pop(wanted, None)
        return model
