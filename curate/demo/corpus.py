"""Deterministic offline demo corpus built from the photographs scikit-image ships.

``build_site`` writes served files under ``site_dir/files``, the ground truth in
``site_dir/manifest.jsonl`` (one line per input row) and special responses in
``site_dir/routes.json``; ``write_input`` turns the manifest into pipeline input.
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import shutil
from collections import Counter
from pathlib import Path

from PIL import Image, ImageEnhance

log = logging.getLogger(__name__)

SLOW_DELAY_S = 30.0  # longer than any sane download timeout; DemoServer(slow_seconds=...) overrides
_BICUBIC = Image.Resampling.BICUBIC
_BAD_URL_KINDS = ("missing_url", "unsupported_scheme", "malformed_url")
_RATES = {"mismatched_caption": 0.08, "exact_duplicate": 0.05, "near_duplicate": 0.08,
          "http_404": 0.02, "corrupt": 0.01, "not_image": 0.01, "noai": 0.01}
_FORMATS, _FORMAT_WEIGHTS = ("jpeg", "png", "webp"), (60, 25, 15)
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_CLOSEUP = ("close-up of {}", "a detail of {}", "cropped photo of {}", "zoomed in on {}")
_NO_FLIP = {"page", "text", "logo"}
_WHOLE = {"horse", "logo", "phantom", "color", "cell", "clock_motion", "microaneurysms"}
_ORIENTS = tuple(Image.Transpose)[:7]  # FLIP_LEFT_RIGHT first, then the other dihedral ops
_GROUPS = {"motorcycle_left": "moto", "motorcycle_right": "moto", "page": "text", "text": "text",
           "retina": "eye", "microaneurysms": "eye", "brick": "tex", "grass": "tex", "gravel": "tex"}
_UNSUPPORTED = ("ftp://images.example.com/photos/cat.jpg", "file:///etc/hosts",
                "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
                "2mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==", "gopher://example.com/1/pic.gif")
_MALFORMED = ("http://", "not a url", "http://exa mple.com/x.jpg", "https:///no-host.png",
              "http://[::1/broken.jpg")

# photo stem | subject phrase for close-ups, then indented alt-text captions separated by ' | '
_CAPTIONS = """
astronaut | a smiling astronaut in an orange flight suit
    a smiling astronaut in an orange flight suit posing in front of the american flag
    official nasa portrait of a woman astronaut holding her helmet, a space shuttle model behind her
    portrait of a female astronaut in an orange spacesuit next to a model rocket
    an astronaut smiling at the camera with the us flag in the background
brick | a grey brick wall
    black and white photo of a brick wall laid in a running bond pattern
    texture of a grey brick wall with mortar lines | rows of bricks in an old wall, seen at an angle
    grayscale brick wall background
camera | a man looking through a camera on a tripod
    black and white photo of a cameraman looking through a camera on a tripod
    a photographer in a dark coat operating a camera on a tripod in a field
    a man taking a picture with a vintage camera, buildings in the distance
    classic grayscale photo of a man with a camera and tripod on a lawn
cell | a cell under a microscope
    microscope image of a single round cell on a grey background
    grayscale microscopy photo of a bright cell
    a living cell photographed through a phase contrast microscope
chelsea | a tabby cat's face
    a tabby cat with green eyes looking to the side | close portrait of an orange and brown striped cat
    a cute tabby cat with long white whiskers | photo of a ginger cat's face, ears up
clock_motion | a clock blurred by motion
    a motion blurred photo of a wall clock | black and white picture of a clock with strong motion blur
    a blurry analog clock on a plain wall
coffee | a cup of espresso on a red saucer
    a cup of coffee on a red saucer with a spoon on a wooden table
    espresso in a white and red cup, seen from above | a hot coffee served on a wooden cafe table
    top view of a coffee cup and saucer
coins | old coins
    rows of old silver coins on a dark background | black and white photo of a collection of ancient coins
    greek coins arranged in a grid
color | a colour wheel
    a circular colour wheel showing the full hue spectrum on black | rainbow colour gradient in a circle
    rgb colour wheel with white at the centre
grass | grass
    grayscale texture of grass blades | close view of a lawn, black and white
    dense grass texture seen from above
gravel | gravel
    texture of small gravel stones | black and white photo of a gravel path from above
    pebbles and gravel background
horse | a black horse silhouette
    black silhouette of a horse on a white background | a horse icon in side view
    simple horse silhouette clip art
hubble_deep_field | distant galaxies
    the hubble deep field showing thousands of distant galaxies
    a deep space photo full of colourful galaxies on black
    hubble telescope image of galaxies scattered across dark space
ihc | a stained tissue sample
    immunohistochemistry slide of tissue stained brown and blue
    microscope image of a stained tissue section | histology sample with brown stained cells
logo | the scikit-image logo
    the scikit-image logo, a green and orange circle with a snake
    green and orange round logo with a snake pattern | scikit-image project logo on a white background
microaneurysms | retinal blood vessels
    grayscale retina image showing blood vessels and microaneurysms
    close-up fundus photo of retinal vessels | medical image of small blood vessels in the eye
moon | the lunar surface
    black and white photo of the surface of the moon with craters | grey lunar surface with small craters
    a crater field on the moon
motorcycle_left | a red motorcycle
    a red motorcycle parked in a garage | a red and chrome motorbike standing in a workshop with shelves
    side view of a classic red motorcycle indoors
motorcycle_right | a red motorcycle
    a parked red cruiser motorcycle next to storage boxes
    a red motorbike in a garage full of cardboard boxes
    side view of a red and black motorcycle with chrome exhaust
page | a page of text
    scanned page of a textbook about region-based segmentation
    a printed page with the heading region-based segmentation
    black and white photo of a page of text with a code snippet
phantom | a shepp-logan phantom
    the shepp-logan phantom, a test image for tomography
    grey ellipses inside a white oval on a black background | synthetic ct scan phantom image
retina | a human retina
    fundus photograph of a human retina with the optic disc | orange-red retina image showing blood vessels
    medical eye exam photo of the back of the eye
rocket | a rocket on the launch pad
    a rocket on the launch pad at dusk with lights | a white rocket standing between launch towers
    rocket ready for launch at night under a blue sky
text | handwritten text
    handwritten mathematical notes on paper, black and white | photo of handwritten formulas on a page
    a sheet of paper covered with handwritten numbers
"""


def _parse_captions(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.strip("\n").splitlines():
        if not line.startswith(" "):
            stem, subject = (s.strip() for s in line.split("|"))
            out[stem] = (subject, [])
        else:
            out[stem][1].extend(c.strip() for c in line.split("|"))
    return {k: (s, tuple(c)) for k, (s, c) in out.items()}


PHOTOS = _parse_captions(_CAPTIONS)


def _load_photos() -> dict[str, Image.Image]:
    import skimage  # only for the location of its bundled photos; never its fetchers

    data = Path(skimage.__file__).parent / "data"
    out = {}
    for stem in PHOTOS:
        path = next(p for p in (data / f"{stem}.png", data / f"{stem}.jpg") if p.exists())
        im = Image.open(path)
        mode = "RGBA" if "A" in im.getbands() else im.mode if im.mode in ("L", "RGB") else "RGB"
        out[stem] = im.convert(mode)
    return out


def _plan_kinds(n: int, rng: random.Random) -> list[str]:
    counts = {k: max(1, round(n * r)) for k, r in _RATES.items()}
    counts["slow"] = 2 if n < 300 else 3
    for k in _BAD_URL_KINDS + ("missing_caption",):
        counts[k] = max(2, round(n * 0.005))
    counts["duplicate_row"] = 2
    while n - sum(counts.values()) < max(1, n // 2):  # tiny corpora: keep at least half originals
        k = max(counts, key=counts.get)
        counts[k] -= 1
    counts["original"] = n - sum(counts.values())
    kinds = [k for k, v in counts.items() for _ in range(v)]
    rng.shuffle(kinds)
    j = kinds.index("original")  # row 0 is an original so every duplicate has an earlier source
    kinds[0], kinds[j] = kinds[j], kinds[0]
    return kinds


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class _Builder:
    def __init__(self, site_dir: Path, rng: random.Random):
        self.files = site_dir / "files"
        self.rng = rng
        self.photos = _load_photos()
        self.taken: dict[str, list] = {s: [] for s in PHOTOS}  # crops used per photo, kept apart
        self.routes: dict[str, dict] = {}
        self.n_files = self.n_bytes = 0

    def path(self, row: int, ext: str, slug: str = "photo") -> str:
        tok = f"{self.rng.getrandbits(32):08x}"
        return (f"/img/{row:05d}.{ext}", f"/cdn/{tok[:2]}/{tok}{row}.{ext}",
                f"/media/photos/{row:05d}-{slug}.{ext}", f"/u/{tok}{row}/image.{ext}")[self.rng.randrange(4)]

    def write(self, path: str, data: bytes) -> None:
        dst = self.files / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        self.n_files += 1
        self.n_bytes += len(data)

    def size(self, special: str | None) -> tuple[int, int]:
        rng = self.rng
        if special == "elongated":
            return 1000, 40
        if special == "tiny":
            s, a = rng.uniform(12, 31), rng.uniform(0.7, 1.5)
        else:
            r = rng.random()
            a = (rng.uniform(2.0, 3.5) if r < 0.08 else 1 / rng.uniform(2.0, 3.0) if r < 0.14
                 else math.exp(rng.uniform(math.log(0.66), math.log(1.6))))
            s = (rng.uniform(400, 700) if rng.random() < 0.12
                 else math.exp(rng.uniform(math.log(48), math.log(400))))
        long = min(s * max(a, 1 / a), 1400.0)
        return (round(long), round(s)) if a >= 1 else (round(s), round(long))

    def image(self, stem: str, special: str | None = None) -> tuple[Image.Image, bool]:
        """A crop/zoom/flip of photo `stem`; returns (image, is_closeup)."""
        rng, src = self.rng, self.photos[stem]
        w, h = self.size(special)
        if stem in _WHOLE and special is None:  # centred objects: keep them whole, near-square
            w, h = (w, max(h, round(w * 0.75))) if w >= h else (max(w, round(h * 0.75)), h)
        sw, sh = src.size
        fw, fh = (sh * w / h, sh) if sw / sh > w / h else (sw, sw * h / w)
        best = None
        for _ in range(24):
            s = 1.0 if special == "elongated" else rng.uniform(0.85 if stem in _WHOLE else 0.35, 1.0)
            x, y = rng.uniform(0, sw - fw * s), rng.uniform(0, sh - fh * s)
            orient = (rng.randrange(8) if stem in _WHOLE and stem != "horse"
                      else int(stem not in _NO_FLIP and rng.random() < 0.3))
            box = (x, y, x + fw * s, y + fh * s)
            ov = max((_iou(box, b) for b, o in self.taken[stem] if o == orient), default=0.0)
            if best is None or ov < best[0]:
                best = (ov, box, orient, s)
            if ov < 0.45:
                break
        _, box, orient, s = best
        self.taken[stem].append((box, orient))
        up = min(w, h) / (3 * min(box[2] - box[0], box[3] - box[1]))  # at most 3x upscaling
        if up > 1 and special is None:
            w, h = max(8, round(w / up)), max(8, round(h / up))
        im = src.resize((w, h), _BICUBIC, box=box)
        if orient:  # 1 = mirror; _WHOLE photos may also be rotated/transposed
            im = im.transpose(_ORIENTS[orient - 1])
        return im, s < 0.5

    def encode(self, im: Image.Image, fmt: str | None = None, q: int | None = None) -> tuple[bytes, str, int]:
        fmt = fmt or self.rng.choices(_FORMATS, _FORMAT_WEIGHTS)[0]
        q = q or (self.rng.randint(55, 95) if fmt == "jpeg" else self.rng.randint(60, 90))
        buf = io.BytesIO()
        if fmt == "jpeg":
            if im.mode not in ("L", "RGB"):
                bg = Image.new("RGB", im.size, "white")
                bg.paste(im, mask=im.getchannel("A") if "A" in im.getbands() else None)
                im = bg
            im.save(buf, "JPEG", quality=q)
        elif fmt == "png":
            im.save(buf, "PNG", compress_level=3)
        else:
            im.save(buf, "WEBP", quality=q, method=2)
        return buf.getvalue(), fmt, q

    def near_dup(self, data: bytes, src_fmt: str, src_q: int):
        rng = self.rng
        im = Image.open(io.BytesIO(data))
        im.load()
        parts = []
        for op in rng.sample(("resize", "crop", "jitter"), rng.choice((0, 1, 1, 2))):
            w, h = im.size
            if op == "resize":
                f = rng.uniform(0.5, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 2.0)
                f = min(f, 2000 / max(w, h))
                im = im.resize((max(8, round(w * f)), max(8, round(h * f))), _BICUBIC)
                parts.append(f"resize({f:.2f})")
            elif op == "crop":
                frac = rng.uniform(0.02, 0.05)
                l, t = rng.uniform(0, frac) * w, rng.uniform(0, frac) * h
                im = im.crop((round(l), round(t), round(w - (frac * w - l)), round(h - (frac * h - t))))
                parts.append(f"crop({frac:.3f})")
            else:
                b, c, s = (rng.uniform(0.88, 1.12) for _ in range(3))
                im = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c)
                if im.mode != "L":
                    im = ImageEnhance.Color(im).enhance(s)
                parts.append(f"jitter(b={b:.2f},c={c:.2f},s={s:.2f})")
        fmt = rng.choices(_FORMATS, _FORMAT_WEIGHTS)[0]
        q = rng.randint(55, 95) if fmt == "jpeg" else rng.randint(60, 90)
        if not parts and fmt == src_fmt:  # a pure re-encode must change the bytes
            fmt, q = ("jpeg", q) if fmt == "png" else (fmt, src_q - 12 if src_q > 70 else src_q + 12)
        data, fmt, q = self.encode(im, fmt, q)
        parts.append("png" if fmt == "png" else f"{fmt}(q={q})")
        return data, fmt, im.size, "+".join(parts)


def build_site(site_dir: Path, n_rows: int = 600, seed: int = 0, slow_delay: float = SLOW_DELAY_S) -> dict:
    """Write a deterministic demo site (files/, manifest.jsonl, routes.json); return counts."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    site_dir = Path(site_dir)
    shutil.rmtree(site_dir / "files", ignore_errors=True)
    (site_dir / "files").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    b = _Builder(site_dir, rng)
    kinds = _plan_kinds(n_rows, rng)
    stems = sorted(PHOTOS)
    weights = [0.3 if s in _WHOLE else 1.0 for s in stems]  # few distinct crops exist of those
    orig_rows = [i for i, k in enumerate(kinds) if k == "original"]
    special = {}
    if len(orig_rows) > 3:
        picks = rng.sample(orig_rows[1:], min(len(orig_rows) - 1, 1 + max(2, n_rows // 120)))
        special = {r: "tiny" for r in picks[1:]}
        special[picks[0]] = "elongated"
    recs: list[dict] = []
    sources: list[int] = []  # originals usable as duplicate sources
    encoded: dict[int, tuple[str, int]] = {}
    for i, kind in enumerate(kinds):
        rec = dict(row=i, kind=kind, path=None, caption=None, photo=None, duplicate_of=None,
                   transform=None, width=None, height=None, format=None)
        if kind in ("exact_duplicate", "near_duplicate", "duplicate_row"):
            src = recs[rng.choice(sources or [r for r in orig_rows if r < i])]
            data = (b.files / src["path"].lstrip("/")).read_bytes()
            rec.update(photo=src["photo"], duplicate_of=src["row"], width=src["width"],
                       height=src["height"], format=src["format"])
            if kind == "duplicate_row":
                rec.update(path=src["path"], caption=src["caption"])
            else:
                rec["caption"] = rng.choice(PHOTOS[src["photo"]][1])
                if kind == "near_duplicate":
                    data, fmt, (w, h), tr = b.near_dup(data, src["format"], encoded[src["row"]][1])
                    rec.update(transform=tr, width=w, height=h, format=fmt)
                rec["path"] = b.path(i, _EXT[rec["format"]], src["photo"].replace("_", "-"))
                b.write(rec["path"], data)
        elif kind in _BAD_URL_KINDS:
            stem = rng.choice(stems)
            rec["caption"] = rng.choice(PHOTOS[stem][1])
            if kind != "missing_url":
                pool = _UNSUPPORTED if kind == "unsupported_scheme" else _MALFORMED
                rec["path"] = pool[sum(k == kind for k in kinds[:i]) % len(pool)]
        elif kind in ("http_404", "not_image"):
            stem = rng.choice(stems)
            rec["caption"] = rng.choice(PHOTOS[stem][1])
            html = kind == "not_image" and rng.random() < 0.5
            rec["path"] = b.path(i, "html" if html else "jpg", stem.replace("_", "-"))
            if kind == "http_404":
                b.routes[rec["path"]] = {"status": 404}
            else:
                rec["format"] = "html"
                b.write(rec["path"], (f"<!doctype html><html><head><title>{rec['caption']}</title></head>"
                                      "<body><h1>Gallery</h1><p>This photo page has moved. "
                                      "<a href=\"/\">Home</a></p></body></html>\n").encode())
                if not html:
                    b.routes[rec["path"]] = {"content_type": "text/html; charset=utf-8"}
        elif kind == "corrupt":
            stem = rng.choice(stems)
            rec.update(caption=rng.choice(PHOTOS[stem][1]), format="jpeg")
            if sum(k == "corrupt" for k in kinds[:i]) % 2 == 0:  # a truncated real JPEG
                data = b.encode(b.image(stem)[0], "jpeg")[0]
                data, rec["photo"] = data[: int(len(data) * rng.uniform(0.3, 0.6))], stem
            else:  # garbage behind a JPEG signature
                data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rng.randbytes(rng.randint(500, 4000))
            rec["path"] = b.path(i, "jpg", stem.replace("_", "-"))
            b.write(rec["path"], data)
        else:  # original, mismatched_caption, noai, slow, missing_caption: a valid served image
            stem = rng.choices(stems, weights)[0] if special.get(i) != "elongated" else "hubble_deep_field"
            im, closeup = b.image(stem, special.get(i))
            subject, caps = PHOTOS[stem]
            caption = rng.choice(_CLOSEUP).format(subject) if closeup else rng.choice(caps)
            if kind == "mismatched_caption":
                other = [s for s in stems if s != stem and _GROUPS.get(s, s) != _GROUPS.get(stem, stem)]
                caption = rng.choice(PHOTOS[rng.choice(other)][1])
            data, fmt, q = b.encode(im)
            rec.update(photo=stem, caption=None if kind == "missing_caption" else caption,
                       width=im.width, height=im.height, format=fmt)
            rec["path"] = b.path(i, _EXT[fmt], stem.replace("_", "-"))
            b.write(rec["path"], data)
            encoded[i] = (fmt, q)
            if kind == "original" and i not in special:
                sources.append(i)
            elif kind == "noai":
                b.routes[rec["path"]] = {"headers": {"X-Robots-Tag": "noai"}}
            elif kind == "slow":
                b.routes[rec["path"]] = {"delay": float(slow_delay)}
        recs.append(rec)
    with open(site_dir / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    (site_dir / "routes.json").write_text(json.dumps(b.routes, indent=1, sort_keys=True) + "\n")
    summary = {"n_rows": n_rows, "seed": seed, "kinds": dict(sorted(Counter(kinds).items())),
               "formats": dict(sorted(Counter(r["format"] for r in recs if r["format"]).items())),
               "n_files": b.n_files, "bytes": b.n_bytes}
    log.info("demo site %s: %d rows, %d files, %.1f MB", site_dir, n_rows, b.n_files, b.n_bytes / 1e6)
    return summary


def read_manifest(site_dir: Path) -> list[dict]:
    with open(Path(site_dir) / "manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_input(site_dir: Path, base_url: str, out_path: Path, fmt: str = "parquet") -> Path:
    """Write the pipeline input (uid, url, caption, source) for the site's manifest, row i = manifest row i."""
    import pyarrow as pa

    base = base_url.rstrip("/")
    recs = read_manifest(site_dir)
    urls = [r["path"] if r["kind"] in _BAD_URL_KINDS or r["path"] is None else base + r["path"] for r in recs]
    # a stable uid per row (the URL holds the server's port); a resubmitted pair reuses its uid
    uids = [f"demo-{(r['duplicate_of'] if r['kind'] == 'duplicate_row' else r['row']):05d}" for r in recs]
    table = pa.table({"uid": pa.array(uids, pa.string()),
                      "url": pa.array(urls, pa.string()),
                      "caption": pa.array([r["caption"] for r in recs], pa.string()),
                      "source": pa.array(["curate-demo"] * len(recs), pa.string())})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out_path)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, out_path)
    elif fmt == "jsonl":
        with open(out_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in table.to_pylist())
    else:
        raise ValueError(f"unsupported input format {fmt!r}; expected parquet, csv or jsonl")
    return out_path
