"""A tiny stand-in model + processor with the contracts of ``medmvl_core.model`` and
``medmvl_core.processing`` (INTERNALS.md), for engine/worker tests and CPU benchmarks.

The LLM is a real transformers Qwen2 (random weights, fixed seed); the "encoder" pools the
volume into ``num_image_tokens`` patches and projects them. Prompts follow MedM-VL's Vicuna
template. Nothing here is used by the released model path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
_PH = {"<image3d>": -201, "<image>": -200}


@dataclass
class ToyGeometry:
    """Maps model-normalized boxes to voxels of the (uncropped or cropped) source array."""

    shape: tuple[int, ...]          # source shape (k, j, i) or (j, i)
    offset: tuple[int, ...]         # crop start in the source

    def model_box_to_voxel(self, box: Sequence[float]) -> list[float]:
        n = len(self.shape)
        lo, hi = box[:n], box[n:]
        return ([o + float(v) * s for v, s, o in zip(lo, self.shape, self.offset)]
                + [o + float(v) * s for v, s, o in zip(hi, self.shape, self.offset)])

    def voxel_box_to_model(self, box: Sequence[float]) -> list[float]:
        n = len(self.shape)
        lo, hi = box[:n], box[n:]
        return ([(float(v) - o) / s for v, s, o in zip(lo, self.shape, self.offset)]
                + [(float(v) - o) / s for v, s, o in zip(hi, self.shape, self.offset)])


class ToyProcessor:
    """Processor stand-in: MedM-VL prompt, chunk-wise tokenization, simple 3D resampling."""

    def __init__(self, tokenizer: Any, kind: str = "image3d", num_image_tokens: int = 8,
                 size: tuple[int, int, int] = (4, 8, 8)):
        self.tokenizer = tokenizer
        self.kind = kind
        self.num_image_tokens = {kind: num_image_tokens}
        self.preprocessing = {kind: {"size": list(size)}}
        self.size = size

    def prompt(self, conversations: list[dict], add_generation_prompt: bool = True) -> str:
        out = SYSTEM + " "
        for turn in conversations:
            if turn["from"] == "human":
                out += "USER: " + turn["value"] + " "
            else:
                out += "ASSISTANT: " + turn["value"] + self.tokenizer.eos_token
        return out + "ASSISTANT:" if add_generation_prompt else out

    def encode(self, conversations: list[dict], mode: str = "generate") -> dict:
        text = self.prompt(conversations, add_generation_prompt=True)
        ids: list[int] = []
        for i, chunk in enumerate(text.split(self._ph)):
            if i:
                ids.extend([_PH[self._ph]] * self.num_image_tokens[self.kind])
            if chunk:
                ids.extend(self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return {"input_ids": ids, "labels": [-100] * len(ids)}

    @property
    def _ph(self) -> str:
        return "<image3d>" if self.kind == "image3d" else "<image>"

    def preprocess_volume(self, volume: Any, roi: Sequence[float] | None = None):
        """-> (float32 [1, D, H, W] in [0, 1], ToyGeometry)."""
        arr = np.asarray(volume.array, dtype=np.float32)
        offset = (0, 0, 0)
        if roi is not None:
            k1, j1, i1, k2, j2, i2 = (int(round(v)) for v in roi)
            arr, offset = arr[k1:k2, j1:j2, i1:i2], (k1, j1, i1)
        idx = [np.linspace(0, n - 1, m).round().astype(int) for n, m in zip(arr.shape, self.size)]
        small = arr[np.ix_(*idx)]
        small = (small - small.min()) / max(float(small.max() - small.min()), 1e-6)
        return small[None].astype(np.float32), ToyGeometry(tuple(arr.shape), offset)

    def preprocess_image(self, image: Any, roi: Sequence[float] | None = None):
        arr = np.asarray(image.array, dtype=np.float32).reshape(image.array.shape[1:3])
        vol = type("V", (), {"array": arr[None]})()
        t, g = self.preprocess_volume(vol, None if roi is None else (0, roi[0], roi[1], 1, roi[2], roi[3]))
        return t[0][None], ToyGeometry(g.shape[1:], g.offset[1:])


class ToyModel(nn.Module):
    """MedMVL-shaped model: encode_images -> [B, N, hidden], placeholders scattered, Qwen2 LLM."""

    def __init__(self, vocab_size: int, kind: str = "image3d", num_image_tokens: int = 8,
                 hidden: int = 64, layers: int = 2, size: tuple[int, int, int] = (4, 8, 8),
                 seed: int = 0, eos_token_id: int | None = None, step_delay_s: float = 0.0):
        super().__init__()
        self.step_delay_s = step_delay_s  # slows each forward (tests that kill a worker mid-answer)
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=False,
                          eos_token_id=eos_token_id)
        self.llm = Qwen2ForCausalLM(cfg).eval()
        self.kind, self.n = kind, num_image_tokens
        d, h, w = size
        self.patch = (d * h * w) // num_image_tokens
        self.proj = nn.Linear(self.patch, hidden)
        self.config = cfg

    def num_image_tokens(self, kind: str) -> int:
        if kind != self.kind:
            raise ValueError(f"toy model has no {kind} path")
        return self.n

    def encode_images(self, images=None, images3d=None) -> torch.Tensor:
        x = images3d if images3d is not None else images
        return self.proj(x.reshape(x.shape[0], self.n, self.patch))

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds=None) -> torch.Tensor:
        mask = input_ids < 0
        emb = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        if mask.any():
            if image_embeds is None or int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
                raise ValueError("placeholder count differs from image feature rows")
            emb = emb.masked_scatter(mask[..., None], image_embeds.to(emb.dtype))
        return emb

    def forward(self, input_ids=None, attention_mask=None, labels=None, images=None, images3d=None,
                image_embeds=None, past_key_values=None, use_cache=None, position_ids=None,
                inputs_embeds=None, **kwargs):
        if self.step_delay_s:
            import time
            time.sleep(self.step_delay_s)
        if image_embeds is None and (images is not None or images3d is not None):
            image_embeds = self.encode_images(images, images3d)
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        return self.llm(inputs_embeds=inputs_embeds,
                        attention_mask=attention_mask, labels=labels,
                        past_key_values=past_key_values, use_cache=use_cache,
                        position_ids=position_ids, **kwargs)

    def generate(self, input_ids, attention_mask, images=None, images3d=None, image_embeds=None,
                 **kw) -> torch.Tensor:
        if image_embeds is None and (images is not None or images3d is not None):
            image_embeds = self.encode_images(images, images3d)
        return self.llm.generate(inputs_embeds=self.embed_inputs(input_ids, image_embeds),
                                 attention_mask=attention_mask, **kw)


@dataclass
class ToyVolume:
    """Minimal Volume (array [k, j, i], spacing/origin (i, j, k), direction 3x3)."""

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: Any = None
    modality: str = "CT"

    def __post_init__(self):
        if self.direction is None:
            self.direction = np.eye(3)


def load_toy(tokenizer_dir: str, kind: str = "image3d", num_image_tokens: int = 8,
             hidden: int = 64, layers: int = 2, size: tuple[int, int, int] = (4, 8, 8),
             seed: int = 0, step_delay_s: float = 0.0):
    """(ToyModel, ToyProcessor) using a tokenizer folder (e.g. the fixture's base/llm)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    proc = ToyProcessor(tok, kind, num_image_tokens, size)
    model = ToyModel(len(tok), kind, num_image_tokens, hidden, layers, size, seed,
                     eos_token_id=tok.eos_token_id, step_delay_s=step_delay_s)
    return model.eval(), proc
