"""The learned palette generator ``cgan-v1``: shipped weights, hash-checked, loaded on first use."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from palstream.errors import PalstreamError
from palstream.learned.backbone import Backbone, create_backbone
from palstream.learned.backbone import block_features as pooled_features
from palstream.learned.model import NetConfig, PaletteNet, active_mask
from palstream.palettes.base import MAX_PALETTE, PaletteGenerator, register_palette_generator

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "palettes" / "weights"
SHIPPED_WEIGHTS = WEIGHTS_DIR / "cgan-v1.pt"
# sha256 of SHIPPED_WEIGHTS, recorded when the shipped model was trained (docs/model-card-cgan-v1.md).
SHIPPED_SHA256 = "cb8237de3847348e51c94fe302b77826964bafa5f885c9586953ec1c6cdbed11"
WEIGHTS_FORMAT = "palstream-cgan/1"


class WeightsError(PalstreamError):
    """A generator's weights file is missing, corrupt or not the recorded one."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(path: Path, luma: PaletteNet, chroma: PaletteNet, backbone: str | None, finetune: dict | None = None) -> str:
    """Write generator weights (plain tensors and dicts, loadable with ``weights_only=True``); returns the sha256.

    ``finetune`` (plain str/int/float values) records how the weights were fine-tuned from others
    (:mod:`palstream.learned.finetune`); it is stored under the key ``"finetune"``, read back with
    :func:`weights_info`, and ignored when the weights are loaded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": WEIGHTS_FORMAT,
        "backbone": backbone or "",
        "luma_config": luma.cfg.to_dict(),
        "chroma_config": chroma.cfg.to_dict(),
        "luma": {k: v.detach().cpu() for k, v in luma.state_dict().items()},
        "chroma": {k: v.detach().cpu() for k, v in chroma.state_dict().items()},
    }
    if finetune is not None:
        blob["finetune"] = dict(finetune)
    torch.save(blob, path)
    return file_sha256(path)


def weights_info(path: Path) -> dict:
    """The fine-tuning record of a weights file (``{}`` for weights straight from ``palstream train``)."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"palette generator weights {path} are unreadable ({type(exc).__name__}); reinstall palstream or retrain") from exc
    return dict(blob.get("finetune", {})) if isinstance(blob, dict) else {}


def load_weights(path: Path, expected_sha256: str | None) -> tuple[PaletteNet, PaletteNet, str, str]:
    """Read and verify a weights file.

    Returns
    -------
    luma, chroma : PaletteNet
        Networks in eval mode on CPU.
    backbone : str
        Name of the backbone whose features the networks accept ("" if none).
    sha256 : str
        Hash of the file.

    Raises
    ------
    WeightsError
        Missing file, hash other than ``expected_sha256``, or content that is not generator weights.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"palette generator weights {path} are missing; reinstall palstream or train them with `palstream train`")
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise WeightsError(
            f"palette generator weights {path} have sha256 {sha[:12]}…, expected {expected_sha256[:12]}…; "
            "the file is damaged or replaced: reinstall palstream"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"not a {WEIGHTS_FORMAT} file")
        nets = []
        for part in ("luma", "chroma"):
            net = PaletteNet(NetConfig(**blob[f"{part}_config"]))
            net.load_state_dict(blob[part])
            nets.append(net.eval().requires_grad_(False))
    except Exception as exc:  # any unpickling/shape error means the same thing to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"palette generator weights {path} are corrupt ({reason[:120]}); reinstall palstream or retrain") from exc
    return nets[0], nets[1], blob["backbone"], sha


@register_palette_generator("cgan-v1")
class CganGenerator(PaletteGenerator):
    """Learned palettes in one batched forward pass (see ``docs/model-card-cgan-v1.md``).

    Parameters
    ----------
    device : str or torch.device, optional
        Defaults to CUDA when available, else CPU.
    weights : path, optional
        Weights file; defaults to the shipped ``cgan-v1.pt``.
    expected_sha256 : str, optional
        Hash the file must have; defaults to the recorded hash of the shipped weights (only when
        ``weights`` is the shipped file). Pass ``None`` with your own weights to skip the check.

    Notes
    -----
    Weights are read on the first :meth:`generate` (or :meth:`load`), not at construction, so
    selecting generators by name stays cheap. Entries ``0..k[i]-1`` of row ``i`` are ordered by
    pixel share, largest first, so the encoder can rank and prune them.
    """

    def __init__(self, device=None, weights: str | Path | None = None, expected_sha256: str | None = "recorded"):
        super().__init__(device)
        self.weights_path = Path(weights) if weights is not None else SHIPPED_WEIGHTS
        if expected_sha256 == "recorded":
            expected_sha256 = SHIPPED_SHA256 if self.weights_path == SHIPPED_WEIGHTS else None
        self.expected_sha256 = expected_sha256
        self._nets: dict[int, PaletteNet] | None = None
        self.backbone_name = ""
        self._backbone: Backbone | None = None  # the CNN of weights trained with its features, made on first use

    def load(self) -> CganGenerator:
        """Read and verify the weights now (raises :class:`WeightsError`)."""
        self._networks()
        return self

    def _networks(self) -> dict[int, PaletteNet]:
        """The luma (1) and chroma (2) networks by sample components, read on first use."""
        if self._nets is None:
            luma, chroma, self.backbone_name, self._sha256 = load_weights(self.weights_path, self.expected_sha256)
            self._nets = {1: luma.to(self.device), 2: chroma.to(self.device)}
        return self._nets

    @property
    def weights_hash(self) -> str:
        """sha256 of the weights file, recorded in archives (reading it loads and verifies the weights)."""
        return self.load()._sha256

    @torch.no_grad()
    def generate_with_scores(
        self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Palettes (N, max(k), C) and entry scores (N, max(k)), entries sorted by score.

        Parameters
        ----------
        samples : torch.Tensor
            float32 (N, P, C), values 0..255; C = 1 (luma) or 2 (Cb/Cr).
        k : torch.Tensor
            int64 (N,), 1..64.
        features : torch.Tensor, optional
            float32 (N, D): backbone features pooled over each block
            (:func:`palstream.learned.backbone.block_features`), used when the weights were
            trained with them; their measured effect is in ``BENCHMARKS.md``.

        Returns
        -------
        palettes : torch.Tensor
            float32 (N, max(k), C) in 0..255; entries past k[i] repeat the first entry.
        scores : torch.Tensor
            float32 (N, max(k)): share of the block's pixels each entry takes (0..1); -1 past k[i].
        """
        nets = self._networks()
        if samples.ndim != 3 or samples.shape[-1] not in (1, 2):
            raise PalstreamError(f"samples must have shape (N, P, 1) or (N, P, 2), got {tuple(samples.shape)}")
        if len(k) and (int(k.min()) < 1 or int(k.max()) > MAX_PALETTE):
            raise PalstreamError(f"palette sizes must be 1..{MAX_PALETTE}, got {int(k.min())}..{int(k.max())}")
        samples = samples.to(self.device, torch.float32)
        k = k.to(self.device)
        net = nets[samples.shape[-1]]
        kmax = int(k.max()) if len(k) else 1
        if features is not None and not net.cfg.feature_dim:
            features = None  # weights trained without features: the block statistics are all it uses
        if features is not None:
            features = features.to(self.device)
        from palstream.learned.decoding import (
            generate_palettes,  # here: decoding imports palettes.base, which imports us
        )

        palettes, shares = generate_palettes(net, samples, k, kmax, features)
        # Largest pixel share first: a prefix of the palette is the best smaller palette we have.
        scores = torch.where(active_mask(k, kmax), shares, torch.full_like(shares, -1.0))
        order = scores.argsort(dim=1, descending=True, stable=True)
        palettes = torch.gather(palettes, 1, order[..., None].expand_as(palettes))
        return palettes.clamp(0, 255), torch.gather(scores, 1, order)

    def block_features(self, luma: np.ndarray, cb: np.ndarray, cr: np.ndarray, boxes: np.ndarray) -> torch.Tensor | None:
        """The backbone's features pooled over each block, the CNN run once per frame
        (:func:`palstream.learned.backbone.block_features`, as in training); None for weights
        trained without features."""
        self._networks()
        if not self.backbone_name:
            return None
        if self._backbone is None:
            self._backbone = create_backbone(self.backbone_name).to(self.device)
        features = torch.empty(len(boxes), self._backbone.channels)
        for f in np.unique(boxes[:, 0]):
            rows = np.flatnonzero(boxes[:, 0] == f)
            top, left, size = boxes[rows, 1:].T
            pooled = pooled_features(self._backbone, luma[f], cb[f], cr[f], np.stack([top, left, size, size], 1))
            features[torch.from_numpy(rows)] = pooled.cpu()
        return features

    def generate(self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.generate_with_scores(samples, k, features)[0]
