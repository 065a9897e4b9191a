"""The LLaVA-style p-MoD model: vision tower -> projector -> decoder with MoD routers.

A plain `nn.Module` with our own loader (`pmod.io`), not a `transformers.PreTrainedModel`: the
decoder is ours, and the checkpoints it must read come in several layouts (official p-MoD,
original LLaVA, llava-hf, ours) that are best handled by explicit key maps that fail loudly, rather
than by `PreTrainedModel`'s implicit renaming and init machinery. We still offer what transformers
users expect: `from_pretrained` / `save_pretrained` with safetensors, `dtype`, `device` /
`device_map`, and construction on the meta device for big checkpoints.

Legend: B rows, T input length, M merged length, N packed tokens, C hidden, V vocab, S image side.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pmod.attention import resolve_backend
from pmod.cache import PmodCache
from pmod.config import PmodConfig
from pmod.io import load_checkpoint, save_pretrained
from pmod.modeling import features
from pmod.modeling.block import AttnContext
from pmod.modeling.chunk import advance_positions, check_continuable, chunk_layout
from pmod.modeling.decoder import LanguageModel
from pmod.modeling.head import next_token_loss, output_logits
from pmod.modeling.init import init_weights
from pmod.modeling.mod import RoutingRecord
from pmod.modeling.projector import build_projector
from pmod.modeling.vision import build_vision_tower
from pmod.packing import Layout, build_layout
from pmod.reduction import ReductionSpec, check_reduction, make_spec
from pmod.validation import check_batch, check_images

__all__ = ["PmodForConditionalGeneration", "PmodOutput", "from_pretrained"]

ImageSize = tuple[int, int]  # (width, height)


@dataclass
class PmodOutput:
    logits: torch.Tensor | None  # [B, M, V] float32; [B, V] with logits_to_keep='last', [B, P, V] with positions
    loss: torch.Tensor | None = None
    past_key_values: PmodCache | None = None
    routing: list[RoutingRecord] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None  # [B, M] bool, real tokens of the merged sequence
    vision_mask: torch.Tensor | None = None  # [B, M] bool, the routing targets
    layout: Layout | None = None


class PmodForConditionalGeneration(nn.Module):
    def __init__(self, config: PmodConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        t = config.text
        self.vision_tower = build_vision_tower(config.vision)
        self.projector = build_projector(config.projector_type, config.vision.hidden_size, t.hidden_size)
        self.language_model = LanguageModel(config)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        if config.uses_image_newline:
            self.image_newline = nn.Parameter(torch.zeros(t.hidden_size))
        self.attn_backend = attn_backend
        self._compiled = None  # a CompiledDecoder after `compile()`

    # --- construction ---------------------------------------------------------------------------
    def init_weights(self, std: float | None = None) -> PmodForConditionalGeneration:
        """Fresh weights for the decoder side (`pmod.modeling.init.init_weights` documents every tensor's init)."""
        return init_weights(self, std)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> PmodForConditionalGeneration:
        return from_pretrained(path, **kwargs)

    def save_pretrained(self, folder: str, **kwargs) -> None:
        save_pretrained(self, folder, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def kernel_backend(self) -> str:
        """Kernels of the MoD ops: "auto" (Triton on CUDA when importable, else PyTorch), "torch" or "triton"."""
        return self.language_model.kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, value: str) -> None:
        if value not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend={value!r}; expected 'auto', 'torch' or 'triton'")
        self.language_model.kernel_backend = value

    def compile(self, **torch_compile_kwargs) -> PmodForConditionalGeneration:
        """Prefill and decode of the decoder through `torch.compile(fullgraph=True, **torch_compile_kwargs)`, one graph
        each for every prompt length (`pmod.modeling.compiled`); `generate` then uses them. `disable=True` undoes it."""
        from pmod.modeling.compiled import CompiledDecoder

        self._compiled = None if torch_compile_kwargs.get("disable") else CompiledDecoder(self, **torch_compile_kwargs)
        return self

    @property
    def reduction(self) -> ReductionSpec | None:
        """The training-free vision-token reduction every prefill applies (`pmod.reduction`), or None."""
        return self.language_model.reduction

    @reduction.setter
    def reduction(self, spec: ReductionSpec | str | None) -> None:
        self.language_model.reduction = check_reduction(self.config, spec)

    def gradient_checkpointing_enable(self) -> None:
        self.language_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.language_model.gradient_checkpointing = False

    # --- images ---------------------------------------------------------------------------------
    def image_token_counts(self, images, image_sizes: list[ImageSize] | None) -> list[int]:
        """Feature tokens of each image, from shapes and sizes alone (before the tower runs)."""
        return features.image_token_counts(self, images, image_sizes)

    def encode_images(self, images, image_sizes: list[ImageSize] | None = None) -> torch.Tensor:
        """Pixels -> projected features of all images, concatenated in order: [sum n_i, C]."""
        return features.encode_images(self, images, image_sizes)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # --- forward --------------------------------------------------------------------------------
    def _backend(self):
        """The attention backend, resolved once per (name, device, dtype): not on every decode step."""
        key = (self.attn_backend, self.device, self.dtype)
        if getattr(self, "_backend_key", None) != key:
            self._backend_cache, self._backend_key = resolve_backend(self.attn_backend, self.device, self.dtype), key
        return self._backend_cache

    def prepare(self, input_ids, images=None, image_sizes=None, attention_mask=None) -> tuple[torch.Tensor, Layout]:
        """Merge text embeddings and image features into the packed sequence: (x [N, C], layout)."""
        ids_host, mask_host = check_batch(input_ids, attention_mask, self.config.text.vocab_size)  # named errors, host copies
        check_images(images, self.config)
        counts = self.image_token_counts(images, image_sizes) if images is not None else []
        layout = build_layout(ids_host, mask_host, counts, self.device, max_length=self.config.model_max_length)
        if self.config.text.mrope_section is not None:  # Qwen2.5-VL: (t, h, w) positions, decode continues after the max
            from pmod.modeling.mrope import attach_mrope

            attach_mrope(layout, ids_host, mask_host, images)
        ids = input_ids.to(self.device).flatten().index_select(0, layout.text_src)  # [Nt]
        emb = self.language_model.embed_tokens(ids)  # [Nt, C]
        x = emb.new_zeros(layout.num_tokens, emb.shape[-1]).index_copy(0, layout.text_dest, emb)
        if counts:
            feats = self.encode_images(images, image_sizes)
            if isinstance(feats, tuple):  # Qwen3-VL: (features, DeepStack features added after the first layers)
                feats, deep = feats
                layout.inject = {i: d.to(device=x.device, dtype=x.dtype) for i, d in enumerate(deep)}
            feats = feats.to(device=x.device, dtype=x.dtype)
            if feats.shape[0] != layout.vision_dest.shape[0]:
                raise RuntimeError(f"vision tower gave {feats.shape[0]} feature tokens, expected {layout.vision_dest.shape[0]}")
            x = x.index_copy(0, layout.vision_dest, feats)
        return x, layout

    def forward(
        self,
        input_ids: torch.Tensor,
        images=None,
        image_sizes: list[ImageSize] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        cache_reserve: int = 0,
        logits_to_keep: str | int | list | torch.Tensor = "all",
        output_routing: bool = True,
        past_key_values: PmodCache | None = None,
    ) -> PmodOutput:
        """Prefill or training forward. `logits_to_keep`: "all" [B, M, V], "last" [B, V] (each row's last token), "none",
        an int k [B, k, V] (each row's last k tokens) or merged positions, shared (1-D) or per row -> [B, P, V]
        (`pmod.modeling.head.output_logits`).
        With `past_key_values`, the inputs are a chunk that continues that cache in place (`pmod.modeling.chunk`):
        logits, routing and masks cover the chunk's tokens only."""
        if past_key_values is not None:
            return self._continue(input_ids, images, image_sizes, attention_mask, labels, past_key_values, cache_reserve,
                                  logits_to_keep, output_routing)
        x, layout = self.prepare(input_ids, images, image_sizes, attention_mask)
        backend = self._backend()
        cache = None
        if use_cache:  # stored in the layout this backend's decode reads
            cache = PmodCache(self.config.text.num_hidden_layers, layout.batch_size, reserve=cache_reserve,
                              heads_first=backend.heads_first_cache)
        run = self.language_model
        if self._compiled is not None and self._compiled.takes_prefill(layout, backend, labels, extend=False):
            run = self._compiled.prefill
        with backend.scope(x.device):
            h, routing = run(x, layout, AttnContext(backend, layout.varlen, cache), record=output_routing)
        layout.inject = None  # DeepStack features are consumed (autograd keeps what it needs): not kept alive by the output
        if cache is not None:
            start = layout.next_positions if layout.next_positions is not None else layout.varlen.lens
            cache.positions = torch.tensor(start, dtype=torch.long).to(h.device, non_blocking=True)
        return self._output(h, labels, layout, cache, routing, logits_to_keep)

    def _continue(self, input_ids, images, image_sizes, attention_mask, labels, cache: PmodCache, cache_reserve: int,
                  logits_to_keep, output_routing: bool) -> PmodOutput:
        """A chunk appended to `cache` (every layer over its cache + the new tokens; positions continue)."""
        if labels is not None:
            raise ValueError("labels with past_key_values: training runs full sequences; continue only at inference")
        backend = self._backend()
        rows = input_ids.shape[0] if torch.is_tensor(input_ids) and input_ids.dim() == 2 else cache.batch_size  # else check_batch names it
        check_continuable(cache, rows, backend.heads_first_cache, backend.name)
        x, layout = self.prepare(input_ids, images, image_sizes, attention_mask)
        layout = chunk_layout(layout, cache, max(self.config.text.max_position_embeddings, self.config.model_max_length))
        cache.reserve = max(cache.reserve, cache_reserve)  # spare slots for the decode steps that follow
        ctx = AttnContext(backend, layout.varlen, cache, extend=True)
        with backend.scope(x.device):
            h, routing = self.language_model(x, layout, ctx, record=output_routing)
        layout.inject = None
        advance_positions(cache, layout)
        return self._output(h, None, layout, cache, routing, logits_to_keep)

    def _output(self, h: torch.Tensor, labels, layout: Layout, cache: PmodCache | None, routing, logits_to_keep) -> PmodOutput:
        """Loss and logits of the final hidden states h [N, C] (packed as `layout`; `pmod.modeling.head`)."""
        loss = None if labels is None else self._loss(h, labels, layout)
        return PmodOutput(
            logits=output_logits(self.lm_head, h, layout, logits_to_keep), loss=loss, past_key_values=cache,
            routing=routing, attention_mask=layout.merged_mask(), vision_mask=layout.pad(layout.vision_mask, False),
            layout=layout,
        )

    def _loss(self, h: torch.Tensor, labels: torch.Tensor, layout: Layout) -> torch.Tensor:
        return next_token_loss(self.lm_head, h, labels, layout)

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: PmodCache) -> torch.Tensor:
        """Feed one token per row [B]; returns next-token logits [B, V] (float32) and advances the cache."""
        backend = self._backend()
        if cache.heads_first != backend.heads_first_cache:
            raise ValueError(f"this cache was filled for a {'heads-first' if cache.heads_first else 'slots-first'} backend; "
                             f"attention backend {backend.name!r} reads the other layout: prefill again with it")
        if token_ids.device != self.device:
            token_ids = token_ids.to(self.device)
        if self._compiled is not None and self._compiled.takes_decode(cache, backend):
            with backend.scope(self.device):
                return self._compiled.decode_step(token_ids, cache)
        x = self.language_model.embed_tokens(token_ids)  # [B, C]
        ctx = AttnContext(backend, cache=cache, decode=True)
        with backend.scope(x.device):
            h = self.language_model.decode(x, cache.positions, ctx)
        cache.advance_positions()
        logits = self.lm_head(h)  # [B, V]
        return logits if logits.dtype == torch.float32 else logits.float()

    def generate(self, input_ids: torch.Tensor, images=None, image_sizes=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Generate new tokens [B, n_new]; see `pmod.generate.generate` for the options."""
        from pmod.generate import generate

        return generate(self, input_ids, images=images, image_sizes=image_sizes, attention_mask=attention_mask, **kwargs)


def from_pretrained(path, *, attn_backend: str = "auto", reduction=None, layer=None, layers=None, keep=None, seed=None,
                    **kwargs) -> PmodForConditionalGeneration:
    """`pmod.from_pretrained`: any supported checkpoint as our model (`pmod.io.load_checkpoint` names the options:
    dtype, device, device_map, vision_tower, config, mod, check_finite). `reduction` ('fastv', 'pyramiddrop',
    'visionzip', 'random', 'uniform' with `layer`/`layers`, `keep`, `seed`, or a ReductionSpec): `pmod.reduction`."""
    model = load_checkpoint(path, lambda cfg: PmodForConditionalGeneration(cfg, attn_backend=attn_backend), **kwargs)
    model.reduction = make_spec(reduction, model.config.text.num_hidden_layers, layer=layer, layers=layers, keep=keep, seed=seed)
    return model
