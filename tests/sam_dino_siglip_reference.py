"""Independent reconstruction of the original three-encoder backbone (`SamDinoSigLIPViTBackbone`), with the libraries
the original used: timm's DINOv2-reg4 and SigLIP ViTs built at 448 px and read through `get_intermediate_layers`, and
Meta's `segment_anything` image encoder, then the original's space-to-depth fold written out from its index formula,
and UHD's tile fusion written from its description (global view, then each tile's map pooled to half size and stitched
[TL TR; BL BR]).

torchvision cannot be installed next to this environment's CPU torch (its PyPI wheels need CUDA torch), but timm and
`segment_anything` import it at module level for parts this reconstruction never touches (image transforms, batch norm
helpers, box ops). Without torchvision, `import_original_libraries` lets those imports succeed with placeholders that
raise if ever called; the ViTs and SAM's encoder are plain torch code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from functools import partial

import torch
import torch.nn.functional as F


class _Unavailable(type):
    """Placeholder classes for torchvision names: attributes are further placeholders, calling one raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _Unavailable(name, (cls,), {})
        setattr(cls, name, placeholder)
        return placeholder

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is not installed: {cls.__name__} is unavailable")


class _TorchvisionPlaceholder(metaclass=_Unavailable):
    pass


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: getattr(_TorchvisionPlaceholder, attr)
        return module

    def exec_module(self, module):
        pass


def import_original_libraries():
    """(timm, segment_anything's ImageEncoderViT); None if they are not installed (the `test` extra)."""
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("segment_anything") is None:
        return None
    if importlib.util.find_spec("torchvision") is None and not any(
        isinstance(finder, _PlaceholderFinder) for finder in sys.meta_path
    ):
        sys.meta_path.append(_PlaceholderFinder())
    import timm
    from segment_anything.modeling import ImageEncoderViT

    return timm, ImageEncoderViT


class OriginalBackbone(torch.nn.Module):
    """The original's modules and forward, with its state-dict names (`dino_featurizer.`, `siglip_featurizer.`,
    `sam_featurizer.`). Sizes: dicts of timm / ImageEncoderViT keyword arguments (widths, depths, heads)."""

    def __init__(self, dino: dict, siglip: dict, sam: dict, uhd: bool = False):
        super().__init__()
        timm, ImageEncoderViT = import_original_libraries()
        self.dino_featurizer = timm.create_model(
            "vit_large_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=448, **dino
        )
        self.siglip_featurizer = timm.create_model(
            "vit_so400m_patch14_siglip_384", pretrained=False, num_classes=0, img_size=448, **siglip
        )
        sam_settings = {  # the original's `_build_sam` for ViT-B; tests shrink widths and depths
            "img_size": 1024,
            "patch_size": 16,
            "mlp_ratio": 4,
            "out_chans": 256,
            "qkv_bias": True,
            "norm_layer": partial(torch.nn.LayerNorm, eps=1e-6),
            "use_rel_pos": True,
            "window_size": 14,
        }
        self.sam_featurizer = ImageEncoderViT(**{**sam_settings, **sam})
        self.uhd = uhd

    @staticmethod
    def lossless_downsample(neck: torch.Tensor) -> torch.Tensor:
        # output channel c*4 + dy*2 + dx of cell (i, j) = input channel c at (2i+dy, 2j+dx); the 32 is hard-coded
        batch, channels = neck.shape[:2]
        out = neck.new_empty(batch, channels * 4, 32, 32)
        for dy in range(2):
            for dx in range(2):
                out[:, dy * 2 + dx :: 4] = neck[:, :, dy::2, dx::2]
        return out

    def encode(self, dino: torch.Tensor, siglip: torch.Tensor, sam: torch.Tensor) -> list[torch.Tensor]:
        """Per encoder, (n, 1024, D) from normalised (n, 3, H, W) inputs."""
        dino_depth, siglip_depth = len(self.dino_featurizer.blocks), len(self.siglip_featurizer.blocks)
        dino_out = self.dino_featurizer.get_intermediate_layers(dino, n={dino_depth - 2})[0]
        siglip_out = self.siglip_featurizer.get_intermediate_layers(siglip, n={siglip_depth - 2})[0]
        sam_out = self.lossless_downsample(self.sam_featurizer(sam)).flatten(2).transpose(1, 2)
        return [dino_out, siglip_out, sam_out]

    def forward(self, dino: torch.Tensor, siglip: torch.Tensor, sam: torch.Tensor) -> torch.Tensor:
        """HD: (B, 3, ...) inputs -> (B, 1024, 3200-like). UHD: (B, 5, 3, ...) -> (B, 1024, 2 x that)."""
        if not self.uhd:
            return torch.cat(self.encode(dino, siglip, sam), dim=-1)
        batch = dino.shape[0]
        features = [f.view(batch, 5, 1024, -1) for f in self.encode(dino.flatten(0, 1), siglip.flatten(0, 1),
                                                                      sam.flatten(0, 1))]
        global_features = torch.cat([f[:, 0] for f in features], dim=-1)
        local = []
        for f in features:
            channels = f.shape[-1]
            maps = f[:, 1:].reshape(batch * 4, 32, 32, channels).permute(0, 3, 1, 2)
            pooled = F.adaptive_avg_pool2d(maps, 16).view(batch, 4, channels, 16, 16)
            top = torch.cat([pooled[:, 0], pooled[:, 1]], dim=-1)  # TL | TR
            bottom = torch.cat([pooled[:, 2], pooled[:, 3]], dim=-1)  # BL | BR
            local.append(torch.cat([top, bottom], dim=-2).flatten(2).transpose(1, 2))
        return torch.cat([global_features, *local], dim=-1)
