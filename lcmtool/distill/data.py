"""Training data for distillation: sources (image folder, the demo world, WebDataset tars) and the latent cache.

A source yields (image [3,H,W] in [-1,1], caption, original (h, w), crop (top, left)) records. `build_cache`
encodes every record once with the teacher's VAE and text encoders into sharded safetensors (latents, caption
index, SDXL time ids) plus one file of unique caption embeddings; `LatentCache` serves batches from it in a
deterministic order (a seed and the stream position), so a resumed run sees no sample twice and skips none.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lcmtool.errors import LcmError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_SIZE = 65536  # records per latent shard


# ---------------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    """What to read: kind 'demo' | 'folder' | 'wds', and the items (paths, tar members or a count)."""
    spec: str
    kind: str
    items: list
    skipped: int = 0  # unreadable images met while iterating (counted, never a crash)
    # a plug-in's source makes its own chunks: (source, resolution, rng, chunk, device) -> (images, captions, geo)
    chunks: Callable | None = None

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.spec}:{len(self.items)}".encode())
        for it in self.items[:: max(1, len(self.items) // 1000)]:
            h.update(repr(it).encode())
        return h.hexdigest()[:16]


_DATA_SCHEMES: dict[str, Callable[[str, int, int], Source]] = {}


def register_data_scheme(scheme: str, open_fn: Callable[[str, int, int], Source]) -> None:
    """`scheme:name` data specs (e.g. `demo:shapes`) open through `open_fn(spec, num_samples, seed)`."""
    _DATA_SCHEMES[scheme] = open_fn


def open_source(spec: str, num_samples: int = 0, seed: int = 0) -> Source:
    """List a data source without decoding it; an empty or missing source is an LcmError before any model loads."""
    if not spec:
        raise LcmError("no training data: pass --data (an image folder, a WebDataset tar glob, or demo:shapes)")
    scheme, sep, _ = spec.partition(":")
    if sep and scheme.isidentifier() and len(scheme) > 1:
        from lcmtool.models.load import load_plugins

        load_plugins()
        if scheme in _DATA_SCHEMES:
            return _DATA_SCHEMES[scheme](spec, num_samples, seed)
    if any(c in spec for c in "*?[") or spec.endswith(".tar"):
        tars = sorted(glob.glob(os.path.expanduser(spec)))
        if not tars:
            raise LcmError(f"no WebDataset shards match {spec}")
        items = []
        for t in tars:
            items += _wds_samples(t)
        if not items:
            raise LcmError(f"the WebDataset shards {spec} hold no image with a caption")
        return Source(spec, "wds", items)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise LcmError(f"data folder not found: {spec}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise LcmError(f"no images ({', '.join(IMAGE_EXTS)}) in data folder {spec}")
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for i, line in enumerate(meta.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str((folder / row["file_name"]).resolve())] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LcmError(f"{meta} line {i + 1}: expected a JSON object with file_name and text") from None
    items = []
    missing = []
    for p in images:
        txt = p.with_suffix(".txt")
        cap = captions.get(str(p.resolve()))
        if cap is None and txt.is_file():
            cap = txt.read_text().strip()
        if cap is None:
            missing.append(p)
        else:
            items.append((str(p), cap))
    if missing:
        raise LcmError(f"{len(missing)} of {len(images)} images in {spec} have no caption (first: {missing[0].name}; "
                       "put name.txt beside each image or a metadata.jsonl with file_name and text)")
    return Source(spec, "folder", items)


def _wds_samples(tar_path: str) -> list:
    """(tar, image member, caption) per sample key of a WebDataset shard; samples without a caption are dropped."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                groups.setdefault(os.path.join(os.path.dirname(m.name), key), {})["." + ext.lower()] = m
            out = []
            for members in groups.values():
                img = next((members[e] for e in (".jpg", ".jpeg", ".png", ".webp") if e in members), None)
                if img is None:
                    continue
                cap = None
                if ".txt" in members:
                    cap = tf.extractfile(members[".txt"]).read().decode("utf-8", "replace").strip()
                elif ".json" in members:
                    try:
                        row = json.loads(tf.extractfile(members[".json"]).read())
                        cap = row.get("caption") or row.get("text")
                    except (json.JSONDecodeError, AttributeError):
                        cap = None
                if cap:
                    out.append((tar_path, img.name, str(cap)))
            return out
    except (tarfile.TarError, OSError) as e:
        raise LcmError(f"cannot read WebDataset shard {tar_path}: {e}") from None


def load_image(img, resolution: int, center_crop: bool, rng: random.Random):
    """PIL image -> ([3,r,r] in [-1,1], original (h, w), crop (top, left)): resize shorter side, then crop."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    if center_crop:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top, left = rng.randint(0, nh - resolution), rng.randint(0, nw - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return x, (h, w), (top, left)


def iterate(source: Source, resolution: int, center_crop: bool = True, seed: int = 0,
            chunk: int = 256, device="cpu") -> Iterator[tuple[torch.Tensor, list[str], torch.Tensor]]:
    """Chunks of (images [n,3,r,r], captions, time-id geometry [n,6] = orig h,w, crop top,left, target h,w).

    Unreadable images are skipped and counted in `source.skipped`.
    """
    from PIL import Image, UnidentifiedImageError

    rng = random.Random(seed)
    if source.chunks is not None:
        yield from source.chunks(source, resolution, rng, chunk, device)
        return
    imgs, caps, geo = [], [], []
    open_tars: dict[str, tarfile.TarFile] = {}
    try:
        for item in source.items:
            try:
                if source.kind == "folder":
                    path, cap = item
                    with Image.open(path) as im:
                        x, orig, crop = load_image(im, resolution, center_crop, rng)
                else:
                    tar_path, member, cap = item
                    tf = open_tars.get(tar_path) or open_tars.setdefault(tar_path, tarfile.open(tar_path))
                    with Image.open(io.BytesIO(tf.extractfile(member).read())) as im:
                        x, orig, crop = load_image(im, resolution, center_crop, rng)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, tarfile.TarError):
                source.skipped += 1
                continue
            imgs.append(x)
            caps.append(cap)
            geo.append([orig[0], orig[1], crop[0], crop[1], resolution, resolution])
            if len(imgs) == chunk:
                yield torch.stack(imgs), caps, torch.tensor(geo, dtype=torch.float32)
                imgs, caps, geo = [], [], []
        if imgs:
            yield torch.stack(imgs), caps, torch.tensor(geo, dtype=torch.float32)
    finally:
        for tf in open_tars.values():
            tf.close()


# ---------------------------------------------------------------------------------------------- cache

def cache_key(model_id: str, source: Source, resolution: int, center_crop: bool, seed: int, uncond: str) -> str:
    """The cache is keyed by (model, data, resolution, crop, seed, unconditional embedding)."""
    text = json.dumps([model_id, source.fingerprint(), resolution, center_crop, seed, uncond])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], family: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher pipeline's own prompt encoding (so training sees what sampling will see)."""
    if family == "sd15":
        emb, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
        return emb, None
    emb, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    return emb, pooled


@torch.no_grad()
def build_cache(pipe, family: str, source: Source, root: Path, resolution: int, center_crop: bool, seed: int,
                uncond: str, device, log=print, chunk: int = 256) -> Path:
    """Encode every record once; written to a temp folder and renamed into place (never half-written)."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    vae = pipe.vae
    gen = torch.Generator(device="cpu").manual_seed(seed)
    caption_ids: dict[str, int] = {}
    lat_buf, idx_buf, geo_buf = [], [], []
    shard, count = 0, 0

    def flush():
        nonlocal shard, lat_buf, idx_buf, geo_buf
        if lat_buf:
            save_file({"latents": torch.cat(lat_buf).contiguous(), "caption_idx": torch.cat(idx_buf),
                       "geometry": torch.cat(geo_buf)}, str(tmp / f"latents-{shard:05d}.safetensors"))
            shard += 1
            lat_buf, idx_buf, geo_buf = [], [], []

    for imgs, caps, geo in iterate(source, resolution, center_crop, seed, chunk, device=device):
        dist = vae.encode(imgs.to(device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
        lat = dist.mean + dist.std * noise  # latent_dist.sample() with a CPU generator: the same on any device
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        lat = (lat - shift) * vae.config.scaling_factor
        lat_buf.append(lat.to("cpu", torch.float16))
        idx_buf.append(torch.tensor([caption_ids.setdefault(c, len(caption_ids)) for c in caps], dtype=torch.int64))
        geo_buf.append(geo)
        count += len(caps)
        if sum(len(x) for x in lat_buf) >= SHARD_SIZE:
            flush()
    flush()
    if count == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LcmError(f"no readable image in {source.spec} ({source.skipped} unreadable skipped)")
    captions = list(caption_ids)
    embs, pools = [], []
    for i in range(0, len(captions), 256):
        e, p = encode_prompts(pipe, captions[i:i + 256], family, device)
        embs.append(e.to("cpu", torch.float16))
        if p is not None:
            pools.append(p.to("cpu", torch.float16))
    # Unconditional embedding: the empty prompt (SD-1.5 family, as in train_lcm_distill_lora_sd_wds.py) or zeros
    # (SDXL family, as in train_lcm_distill_lora_sdxl.py / force_zeros_for_empty_prompt).
    ue, up = encode_prompts(pipe, [""], family, device)
    if uncond == "zeros":
        ue = torch.zeros_like(ue)
        up = torch.zeros_like(up) if up is not None else None
    text = {"prompt_embeds": torch.cat(embs), "uncond_embeds": ue.to("cpu", torch.float16)}
    if pools:
        text["pooled_embeds"] = torch.cat(pools)
        text["uncond_pooled"] = up.to("cpu", torch.float16)
    save_file(text, str(tmp / "text.safetensors"))
    meta = {"count": count, "skipped": source.skipped, "shards": shard, "resolution": resolution,
            "center_crop": center_crop, "family": family, "data": source.spec, "uncond": uncond,
            "captions": captions}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if root.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
    return root


def cache_root(cache_dir: str = "") -> Path:
    """The cache's root folder: `cache_dir`, else $LCMTOOL_CACHE/distill or ~/.cache/lcmtool/distill."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LCMTOOL_CACHE", Path.home() / ".cache" / "lcmtool")) / "distill"


def prepare_cache(pipe, family: str, source: Source, root: Path, resolution: int, center_crop: bool, seed: int,
                  uncond: str, device, log=print) -> Path:
    """build_cache with the teacher's VAE and text encoders on `device` for the call (they leave it for the
    training); says how long a fresh cache took."""
    import time

    from lcmtool.distill.teacher import encoders_on

    t0, fresh = time.time(), not (Path(root) / "meta.json").is_file()
    with encoders_on(pipe, device):
        build_cache(pipe, family, source, root, resolution, center_crop, seed, uncond, device)
    if fresh:
        n_cached = json.loads((Path(root) / "meta.json").read_text())["count"]
        log(f"cached {n_cached} latents in {time.time() - t0:.1f}s -> {root}")
    return Path(root)


def fits_in_memory(source: Source, pipe, resolution: int) -> bool:
    """Whether the cached fp16 latents stay under 1 GiB (then they are served from the training device)."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return len(source) * 4 * (resolution // vae_factor) ** 2 * 2 < 2 ** 30


class LatentCache:
    """All cached latents in memory; `batch(position, n)` serves the samples at stream positions [p, p + n).

    The stream is epoch after epoch of the dataset, each epoch in the order of a permutation seeded by
    (seed, epoch): position p is epoch p // N, item perm_e[p % N]. Resuming at the saved position therefore
    sees no sample twice and skips none.
    """

    def __init__(self, root: Path, seed: int, device="cpu"):
        from safetensors.torch import load_file

        root = Path(root)
        self.meta = json.loads((root / "meta.json").read_text())
        shards = [load_file(str(root / f"latents-{i:05d}.safetensors")) for i in range(self.meta["shards"])]
        self.latents = torch.cat([s["latents"] for s in shards]).to(device)
        self.caption_idx = torch.cat([s["caption_idx"] for s in shards]).to(device)
        self.geometry = torch.cat([s["geometry"] for s in shards]).to(device)
        text = load_file(str(root / "text.safetensors"))
        self.text = {k: v.to(device) for k, v in text.items()}
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.latents)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self), generator=g).to(self.latents.device)}
        return self._perms[epoch]

    def indices(self, position: int, n: int) -> torch.Tensor:
        out, p = [], position
        while p < position + n:
            epoch, off = divmod(p, len(self))
            take = min(len(self) - off, position + n - p)
            out.append(self._perm(epoch)[off:off + take])
            p += take
        return torch.cat(out)

    def batch(self, position: int, n: int) -> dict:
        idx = self.indices(position, n)
        cap = self.caption_idx[idx]
        out = {"latents": self.latents[idx], "prompt_embeds": self.text["prompt_embeds"][cap],
               "geometry": self.geometry[idx]}
        if "pooled_embeds" in self.text:
            out["pooled_embeds"] = self.text["pooled_embeds"][cap]
        return out


# ---------------------------------------------------------------------------------------------- teacher samples

def teacher_cache_root(root: Path, guidance: float, steps: int, count: int) -> Path:
    """The folder of the teacher-sample cache made from the latent cache at `root`."""
    return Path(root).with_name(f"{Path(root).name}-teacher-cfg{guidance:g}-dpmpp{steps}-n{count}")


@torch.no_grad()
def build_teacher_cache(unet, scheduler_config: dict, src: Path, root: Path, guidance: float, steps: int,
                        count: int, seed: int, device, dtype, chunk: int = 256, progress=None) -> Path:
    """A latent cache whose latents are the teacher's own samples instead of the encoded training images.

    Record i of the cache at `src` (its caption, SDXL time ids) is replaced by DPM-Solver++(2M) `steps` steps of
    the teacher `unet` at CFG scale `guidance` from noise of a generator seeded by (seed, chunk), against the
    cache's own unconditional embedding, as the LCD teacher is guided; the first `count` records (0: all). So
    LCD's starting points z_{n+k} are noised samples of the guided teacher: the points its guided PF-ODE (and the
    LCM sampler's re-noised steps) pass through, where noised training images are the unguided model's.
    Published whole by fileio.atomic_dir (a failure leaves nothing); `progress(done, total)` after each chunk."""
    from safetensors.torch import save_file

    from lcmtool.fileio import atomic_dir
    from lcmtool.models.schedulers import make_scheduler

    root, src = Path(root), Path(src)
    if (root / "meta.json").is_file():
        return root
    real = LatentCache(src, seed)
    caption_idx, geometry, text = real.caption_idx, real.geometry, real.text
    total = len(real) if count <= 0 else min(count, len(real))
    xl = "pooled_embeds" in text
    sched = make_scheduler("dpmpp", scheduler_config)
    uncond = text["uncond_embeds"].to(device, dtype)
    out = []
    for start in range(0, total, chunk):
        idx = caption_idx[start:min(start + chunk, total)]
        n = len(idx)
        cond = text["prompt_embeds"][idx].to(device, dtype)
        ctx = torch.cat([uncond.expand_as(cond), cond])
        added = None
        if xl:
            pooled = text["pooled_embeds"][idx].to(device, dtype)
            ids = geometry[start:start + n].to(device, dtype)
            added = {"text_embeds": torch.cat([text["uncond_pooled"].to(device, dtype).expand_as(pooled), pooled]),
                     "time_ids": torch.cat([ids, ids])}
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        sched.set_timesteps(steps, device=device)
        z = (torch.randn((n, *real.latents.shape[1:]), generator=g) * sched.init_noise_sigma).to(device, torch.float32)
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([z, z]), t).to(dtype)
            eps = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False)[0].float()
            eps_u, eps_c = eps.chunk(2)
            z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z, return_dict=False)[0]
        out.append(z.to("cpu", torch.float16))
        if progress:
            progress(start + n, total)
    latents = torch.cat(out)
    starts = range(0, total, SHARD_SIZE)
    meta = dict(real.meta, count=total, shards=len(starts),
                teacher_samples={"guidance": guidance, "steps": steps, "solver": "dpmpp", "seed": seed,
                                 "source_cache": src.name})
    with atomic_dir(root) as tmp:
        for shard, a in enumerate(starts):
            save_file({"latents": latents[a:a + SHARD_SIZE].contiguous(),
                       "caption_idx": caption_idx[a:min(a + SHARD_SIZE, total)].contiguous(),
                       "geometry": geometry[a:min(a + SHARD_SIZE, total)].contiguous()},
                      str(tmp / f"latents-{shard:05d}.safetensors"))
        shutil.copy2(src / "text.safetensors", tmp / "text.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta))
    return root
