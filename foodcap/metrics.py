"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), SPICE when it can run, CLIPScore.

Text is tokenised with the Stanford PTB tokenizer that ships with pycocoevalcap (as the COCO caption
evaluation does). The Java parts (PTB tokenizer, METEOR, SPICE) are run as subprocesses with temp files
outside site-packages and a time limit; whatever cannot run is listed in `skipped` with the reason,
and the pure-Python metrics are still computed (with a simple tokenizer when Java is missing).

    python -c "from foodcap.metrics import score_captions as s; print(s({1: ['a bowl of soup'], 2: ['two red apples']}, {1: 'a bowl of soup', 2: 'a red apple'}).corpus)"
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)

ALL_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
# Tokens the COCO evaluation drops after PTB tokenisation.
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
                "-lrb-", "-rrb-", "-lcb-", "-rcb-"}
_JAVA_TIMEOUT_S = float(os.environ.get("FOODCAP_JAVA_TIMEOUT", "600"))


@dataclass
class MetricsResult:
    """Corpus scores, per-image scores (same keys as the input), and metrics that could not run, with why."""

    corpus: dict[str, float] = field(default_factory=dict)
    per_image: dict[Hashable, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"

    def to_dict(self) -> dict:
        return {"corpus": self.corpus, "skipped": self.skipped, "tokenizer": self.tokenizer}


def _pycoco_dir() -> Path:
    import pycocoevalcap  # a namespace package: no __file__

    return Path(list(pycocoevalcap.__path__)[0]).resolve()


def java_missing_reason() -> Optional[str]:
    """None when a working `java` is on PATH, else why not (the Java metrics are skipped then)."""
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH (install a Java runtime, e.g. `apt-get install default-jre-headless`)"
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`java -version` failed ({exc})"
    return None


def spice_missing_reason() -> Optional[str]:
    """SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use; no download here."""
    lib = _pycoco_dir() / "spice" / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        return (f"SPICE needs {', '.join(missing)} in {lib}; pycocoevalcap downloads them on first use and foodcap "
                "never downloads. With network access run `python -m pycocoevalcap.spice.get_stanford_models` once")
    return None


# ---------------------------------------------------------------- tokenisation

def simple_tokenize(text: str) -> str:
    """Lower-case words and numbers, punctuation dropped: a Java-free stand-in for the PTB tokenizer."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford PTB tokenisation (lower-cased, punctuation removed), one output per input, via Java."""
    if not texts:
        return []
    jar = _pycoco_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    lines = "\n".join(re.sub(r"[\r\n]+", " ", t) for t in texts)
    proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"],
                          input=lines.encode("utf-8"), capture_output=True, timeout=_JAVA_TIMEOUT_S, check=True)
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(texts):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(texts)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCTUATION) for line in out[:len(texts)]]


def tokenize_all(groups: Mapping[Hashable, Sequence[str]], tokenizer: str) -> dict[Hashable, list[str]]:
    keys = list(groups)
    flat = [c for k in keys for c in groups[k]]
    if tokenizer not in ("ptb", "simple", "none"):
        raise ValueError(f"tokenizer must be 'ptb', 'simple', 'none' (already tokenised) or 'auto', got {tokenizer!r}")
    tokens = ptb_tokenize(flat) if tokenizer == "ptb" else flat if tokenizer == "none" else [simple_tokenize(c) for c in flat]
    out, i = {}, 0
    for k in keys:
        out[k] = tokens[i:i + len(groups[k])]
        i += len(groups[k])
    return out


# ---------------------------------------------------------------- Java metrics

def _meteor(gts: Mapping, res: Mapping) -> tuple[float, list[float]]:
    """METEOR 1.5 through its `-stdio` protocol: SCORE lines give statistics, one EVAL line scores them."""
    meteor_dir = _pycoco_dir() / "meteor"
    proc = subprocess.Popen(["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
                            cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(_JAVA_TIMEOUT_S, proc.kill)  # a hung JVM unblocks readline by dying
    watchdog.start()

    def ask(line: str) -> str:
        proc.stdin.write((line + "\n").encode("utf-8"))
        proc.stdin.flush()
        reply = proc.stdout.readline().decode("utf-8").strip()
        if not reply:
            raise RuntimeError("METEOR process ended without an answer (out of memory or timed out?)")
        return reply

    try:
        stats = []
        for k in gts:
            hyp = res[k][0].replace("|||", "").replace("  ", " ")
            refs = [r.replace("|||", "") for r in gts[k]]
            stats.append(ask(" ||| ".join(["SCORE", *refs, hyp])))
        first = ask(" ||| ".join(["EVAL", *stats]))
        per = [float(first)] + [float(proc.stdout.readline().decode().strip()) for _ in range(len(stats) - 1)]
        corpus = float(proc.stdout.readline().decode().strip())
        return corpus, per
    finally:
        watchdog.cancel()
        if proc.stdin:
            proc.stdin.close()
        proc.kill()
        proc.wait()


def _spice(gts: Mapping, res: Mapping) -> tuple[float, list[float]]:
    spice_dir = _pycoco_dir() / "spice"
    keys = list(gts)
    with tempfile.TemporaryDirectory(prefix="foodcap-spice-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps([{"image_id": i, "test": res[k][0], "refs": list(gts[k])} for i, k in enumerate(keys)]))
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foodcap" / "spice"
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(src), "-cache", str(cache), "-out", str(dst),
                        "-subset", "-silent"], cwd=spice_dir, check=True, timeout=_JAVA_TIMEOUT_S, capture_output=True)
        by_id = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(dst.read_text())}
    per = [float(by_id[i]) if by_id.get(i) is not None else float("nan") for i in range(len(keys))]
    finite = [s for s in per if s == s]
    return (sum(finite) / len(finite) if finite else float("nan")), per


# ---------------------------------------------------------------- the COCO metrics

def score_captions(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], *,
                   metrics: Iterable[str] = ALL_METRICS, tokenizer: str = "auto") -> MetricsResult:
    """Score one candidate caption per image against that image's reference captions.

    `tokenizer`: "ptb" (Java), "simple" (pure Python), "auto" (PTB when Java works) or "none" (the texts are
    already tokenised, e.g. by `tokenize_all`, to score many candidates cheaply). CIDEr's document
    frequencies come from these references, so score a whole split at once (one image alone scores 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(candidates)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}; every candidate needs at least one")
    wanted = {m.upper() for m in metrics}
    result = MetricsResult(per_image={k: {} for k in keys})
    no_java = java_missing_reason()
    automatic = tokenizer == "auto"
    if automatic:
        tokenizer = "simple" if no_java else "ptb"
    if tokenizer == "ptb" and no_java:
        raise RuntimeError(f"the PTB tokenizer needs Java: {no_java}; use tokenizer='simple'")
    if no_java and tokenizer == "simple":
        result.skipped["PTB tokenizer"] = f"{no_java}; used a simple lower-case word tokenizer instead"
    result.tokenizer = tokenizer
    if not keys:
        return result
    try:
        gts = tokenize_all({k: list(references[k]) for k in keys}, tokenizer)
        res = tokenize_all({k: [candidates[k]] for k in keys}, tokenizer)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        if not (automatic and tokenizer == "ptb"):
            raise
        # Java is there but the tokenizer failed (memory, timeout, broken jar): score anyway, and say so.
        reason = f"PTB tokenizer failed ({type(exc).__name__}: {exc}); used a simple lower-case word tokenizer instead"
        log.warning("%s", reason)
        result.skipped["PTB tokenizer"], result.tokenizer, tokenizer = reason, "simple", "simple"
        gts = tokenize_all({k: list(references[k]) for k in keys}, tokenizer)
        res = tokenize_all({k: [candidates[k]] for k in keys}, tokenizer)

    def record(name: str, corpus: float, per: Sequence[float]) -> None:
        result.corpus[name] = float(corpus)
        for k, s in zip(keys, per):
            result.per_image[k][name] = float(s)

    if "BLEU" in wanted:
        corpus, per = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            record(f"BLEU-{n + 1}", corpus[n], per[n])
    for name, scorer in (("ROUGE-L", Rouge), ("CIDEr", Cider)):
        if name.upper() in wanted:
            record(name, *scorer().compute_score(gts, res))
    for name, run, reason in (("METEOR", _meteor, no_java), ("SPICE", _spice, no_java or spice_missing_reason())):
        if name not in wanted:
            continue
        if reason:
            result.skipped[name] = reason
            continue
        try:
            record(name, *run(gts, res))
        except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            result.skipped[name] = f"{name} failed: {type(exc).__name__}: {exc}"
            log.warning("%s skipped: %s", name, exc)
    for name, reason in result.skipped.items():
        log.info("%s skipped: %s", name, reason)
    return result


# ---------------------------------------------------------------- CLIPScore

def clip_scores(image_embeddings: torch.Tensor, candidates: Sequence[str],
                encode_text: Callable[[list[str]], torch.Tensor], references: Optional[Sequence[Sequence[str]]] = None,
                *, w: float = 2.5, prefix: str = "A photo depicts ") -> dict[str, list[float]]:
    """CLIPScore and RefCLIPScore of Hessel et al. (2021), per image.

    CLIP-S(c, v) = w * max(cos(c, v), 0); RefCLIP-S = harmonic mean of CLIP-S and max(max_r cos(c, r), 0).
    `image_embeddings` (N, D) and `encode_text` must come from the same CLIP model; captions get the
    paper's "A photo depicts" prompt.
    """
    if len(candidates) != image_embeddings.shape[0]:
        raise ValueError(f"{len(candidates)} captions for {image_embeddings.shape[0]} image embeddings")
    if not candidates:
        return {"CLIPScore": [], "RefCLIPScore": []} if references is not None else {"CLIPScore": []}
    images = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)  # (N, D)
    texts = torch.nn.functional.normalize(encode_text([prefix + c for c in candidates]).float().to(images.device), dim=-1)
    if texts.shape != images.shape:
        raise ValueError(f"text embeddings {tuple(texts.shape)} do not match image embeddings {tuple(images.shape)}: "
                         "use the CLIP model the features were extracted with")
    clip_s = w * (images * texts).sum(-1).clamp_min(0)  # (N,)
    out = {"CLIPScore": clip_s.tolist()}
    if references is not None:
        flat = [prefix + r for refs in references for r in refs]
        ref_emb = torch.nn.functional.normalize(encode_text(flat).float().to(images.device), dim=-1)  # (R, D)
        ref_clip, start = [], 0
        for i, refs in enumerate(references):
            sims = ref_emb[start:start + len(refs)] @ texts[i]  # (R_i,)
            start += len(refs)
            best = float(sims.max().clamp_min(0)) if len(refs) else 0.0
            c = float(clip_s[i])
            ref_clip.append(2 * c * best / (c + best) if c + best > 0 else 0.0)
        out["RefCLIPScore"] = ref_clip
    return out
