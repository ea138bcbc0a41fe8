"""Feature-extraction speed: foodcap's pipeline against the reference's naive loop, same weights, same images.

    python bench/bench_extract.py            # 16 real photos x 5 captions, random-weight RN50x4 (~2 min on 2 CPU cores)
    python bench/bench_extract.py --quick    # 2 photos, for a smoke run
    python bench/bench_extract.py --images 32 --device cuda
    python bench/bench_extract.py --megapixels 12   # phone-size photos: decoding matters too

The naive baseline is written here as the ClipCap / food-fork scripts do it: for every caption row, read the
image, preprocess it, encode it alone under no_grad with the model as `clip.load` gives it (fp32 on a CPU,
BatchNorms in place, default memory layout), so an image with 5 captions is encoded 5 times.
foodcap's run (plan, decoding, batched inference_mode encoding, chunk saving, store building) is timed end to
end after the encoder is loaded, once before and once after the naive loop; the slower run is reported. It
runs at `--precision` (default auto: bf16 on a CPU with AMX, fp16 on CUDA, else fp32) and, for comparison,
at fp32. Printed: images/s and captions/s of each, the ratios, and each run's largest embedding difference
from the naive loop.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "tests" / "data" / "images").glob("*.jpg"))


def make_set(root: Path, n_images: int, per_image: int, megapixels: float = 0) -> Path:
    """n real photos (the bundled ones, cycled under new names) with `per_image` captions each, COCO-like;
    with `megapixels`, each is resized to about that many pixels first (phone photos are ~12 MP)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for i in range(n_images):
        target = root / "images" / f"{i:06d}.jpg"
        if megapixels:
            photo = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
            scale = (megapixels * 1e6 / (photo.width * photo.height)) ** 0.5
            photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC).save(target, quality=92)
        else:
            shutil.copy(PHOTOS[i % len(PHOTOS)], target)
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(n_images):
            for j in range(per_image):
                w.writerow([f"{i:06d}.jpg", f"a photo of dish {i}, described the {j + 1}th way"])
    return root / "captions.csv"


def naive_extract(caption_file: Path, encoder) -> tuple[torch.Tensor, list[dict], float]:
    """The reference loop: one caption row at a time, its image read and encoded alone, once per caption."""
    from PIL import Image

    rows = list(csv.DictReader(open(caption_file, newline="")))
    start = time.perf_counter()
    embeddings, captions = [], []
    for i, row in enumerate(rows):
        image = Image.open(caption_file.parent / "images" / row["image"]).convert("RGB")
        pixels = encoder.preprocess(image).unsqueeze(0).to(encoder.device, dtype=encoder.dtype)  # (1, 3, H, W)
        with torch.no_grad():
            prefix = encoder.model.encode_image(pixels).float().cpu()  # (1, D)
        embeddings.append(prefix)
        captions.append({"image_id": row["image"], "caption": row["caption"], "clip_embedding": i})
    return torch.cat(embeddings), captions, time.perf_counter() - start


def foodcap_extract(caption_file: Path, encoder, work: Path, batch_size: int, num_workers: int):
    from foodcap.datasets import read_dataset
    from foodcap.extraction import plan_extraction
    from foodcap.extractor import build_stores, merge_parts, run_shard

    start = time.perf_counter()
    plan = plan_extraction(read_dataset(caption_file).records, test_size=0)
    run_shard(plan, encoder, work, batch_size=batch_size, num_workers=num_workers)
    merged = merge_parts(plan, work, encoder_name=encoder.name, batch_size=batch_size)
    store = build_stores(plan, merged, {"clip_model": encoder.name}, encoder.embed_dim)["train"]
    return store, time.perf_counter() - start


def main(argv=None) -> int:
    from foodcap.commands.extract import _default_workers
    from foodcap.encoder_tuning import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:RN50x4", help="encoder name (random weights need no download)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--megapixels", type=float, default=0, help="resize the photos to this size (default: as "
                   "bundled, 0.2-1.7 MP; 12 = a phone camera)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=None, help="decoding workers (default: as foodcap extract)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="foodcap's precision (default auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="2 images: a smoke run")
    args = p.parse_args(argv)
    n_images = 2 if args.quick else args.images

    from foodcap.encoders import load_encoder

    t = time.perf_counter()
    naive_encoder = load_encoder(args.model, device=args.device, fold_norms=False)  # as clip.load gives it
    naive_encoder.model.visual.to(memory_format=torch.contiguous_format)
    ours = {p: load_encoder(args.model, device=args.device, precision=p) for p in dict.fromkeys((args.precision, "fp32"))}
    first = next(iter(ours.values()))
    workers = args.num_workers if args.num_workers is not None else _default_workers(first.device.type)
    print(f"encoder {args.model}: {first.embed_dim}-d, {first.image_size}px, loaded in "
          f"{time.perf_counter() - t:.1f}s on {first.device}; torch threads {torch.get_num_threads()}; "
          f"foodcap at {', '.join(e.precision for e in ours.values())}, {workers} decode workers")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        caption_file = make_set(Path(tmp) / "set", n_images, args.captions_per_image, args.megapixels)
        n_captions = n_images * args.captions_per_image
        for enc in (naive_encoder, *ours.values()):  # warm-up (first-call allocations) so no side pays it
            enc.encode_images(torch.zeros(1, 3, enc.image_size, enc.image_size))
        # each foodcap run goes before and after the naive loop; the slower is reported, so load from other
        # processes on a shared machine cannot flatter it.
        before = {p: foodcap_extract(caption_file, e, Path(tmp) / f"{p}1", args.batch_size, workers)
                  for p, e in ours.items()}
        naive_emb, naive_caps, t_naive = naive_extract(caption_file, naive_encoder)
        for p, e in ours.items():
            store, t_before = before[p]
            _, t_after = foodcap_extract(caption_file, e, Path(tmp) / f"{p}2", args.batch_size, workers)
            results[e.precision] = (store, t_before, t_after)

    scale = float(naive_emb.abs().max())
    naive_img_s = n_captions / t_naive  # the naive loop encodes one image per caption row
    print(f"\n{n_images} distinct images x {args.captions_per_image} captions = {n_captions} captions, "
          f"batch {args.batch_size}, {workers} decode workers; embedding scale {scale:.2e}")
    print(f"{'':24}{'seconds':>9}{'images/s':>11}{'captions/s':>12}{'x/image':>9}{'x/caption':>11}{'max diff':>10}")
    print(f"{'naive (reference loop)':24}{t_naive:9.2f}{naive_img_s:11.3f}{n_captions / t_naive:12.3f}")
    for precision, (store, t_before, t_after) in results.items():
        t_ours = max(t_before, t_after)
        row_of = {c["caption"]: c["clip_embedding"] for c in store.captions}
        diff = max(float((store.embeddings[row_of[c["caption"]]] - naive_emb[c["clip_embedding"]]).abs().max())
                   for c in naive_caps)
        print(f"{'foodcap ' + precision:24}{t_ours:9.2f}{n_images / t_ours:11.3f}{n_captions / t_ours:12.3f}"
              f"{n_images / t_ours / naive_img_s:9.2f}{t_naive / t_ours:11.2f}{diff:10.1e}"
              f"   (runs before/after the naive loop: {t_before:.2f}s / {t_after:.2f}s)")
    print("\ntargets: >= 1.3x per distinct image; >= 4x per caption with 5 captions per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
