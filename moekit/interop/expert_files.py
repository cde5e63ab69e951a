"""Where each routed expert of a model lies in its safetensors files, read one expert at a
time by byte range: a moekit checkpoint's 3-D ``[E, in, out]`` tensors, or a Hugging Face
directory's per-expert ``[out, in]`` weights or fused ``gate_up_proj``/``down_proj``.
Expert offloading (:mod:`moekit.inference.offload`) reads through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.interop.hf_weights import moe_prefix
from moekit.interop.safetensors_ranges import TensorLocation, read_tensor, tensor_locations

# one projection of one expert: (where, index into its first dim, rows of what that gives, transpose)
_Piece = tuple[TensorLocation, "int | None", "tuple[int, int] | None", bool]


class ExpertSource:
    """Where each routed SwiGLU expert of a model lies in safetensors files.

    ``locate(layer, e)`` gives the three pieces (gate ``w1``, up ``w3``, down ``w2``);
    :meth:`read` returns them as moekit holds them (``w1``/``w3`` ``[d_model, d_ff]``,
    ``w2 [d_ff, d_model]``, in ``dtype``; a Hugging Face file's ``[out, in]`` weights as
    transposed views, not copied). Build one with :meth:`for_run` or
    :meth:`for_hf`, which check every tensor's shape first.
    """

    def __init__(self, locate: Callable[[int, int], tuple[_Piece, _Piece, _Piece]], layers: list[int],
                 num_experts: int, d_model: int, d_ff: int, dtype: torch.dtype):
        self.locate, self.layers, self.num_experts = locate, layers, num_experts
        self.d_model, self.d_ff, self.dtype = d_model, d_ff, dtype
        self.expert_bytes = 3 * d_model * d_ff * dtype.itemsize
        self._fds: dict[Path, int] = {}

    @property
    def total_bytes(self) -> int:
        return len(self.layers) * self.num_experts * self.expert_bytes

    def read(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for loc, index, rows, transpose in self.locate(layer, e):
            fd = self._fds.get(loc.file)
            if fd is None:
                fd = self._fds[loc.file] = os.open(loc.file, os.O_RDONLY)
            t = read_tensor(fd, loc, index, rows)
            if transpose:  # Hugging Face's [out, in] as moekit's [in, out]: a view, the matmuls take it as is
                t = t.t()
            out.append(t if t.dtype == self.dtype else t.to(self.dtype))
        return tuple(out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @classmethod
    def for_run(cls, file: Path, config: ModelConfig, dtype: torch.dtype) -> ExpertSource:
        """The experts of a moekit checkpoint ``file`` (``blocks.{i}.ffn.experts.w1`` etc.,
        ``[E, in, out]``)."""
        locs, E, d, f = tensor_locations(file), config.moe.num_experts, config.d_model, config.moe.d_ff
        layers = _moe_layers(config)
        pieces = {}
        for i in layers:
            names = [f"blocks.{i}.ffn.experts.{w}" for w in ("w1", "w3", "w2")]
            pieces[i] = [_located(locs, n, shape, file) for n, shape in zip(names, ((E, d, f), (E, d, f), (E, f, d)))]
        return cls(lambda i, e: tuple((loc, e, None, False) for loc in pieces[i]), layers, E, d, f, dtype)

    @classmethod
    def for_hf(cls, files, config: ModelConfig, family, dtype: torch.dtype) -> ExpertSource:
        """The experts of a Hugging Face directory (``files``: its
        :class:`~moekit.interop.safetensors_io.SafetensorsDir`), per-expert
        (``experts.{e}.w1.weight [d_ff, d_model]``) or fused (``experts.gate_up_proj``)."""
        E, d, f = config.moe.num_experts, config.d_model, config.moe.d_ff
        layers, by_file = _moe_layers(config), {}

        def loc(key: str, shape: tuple[int, ...]) -> TensorLocation:
            if key not in files:
                raise ValueError(f"{files.directory}: missing {key} (expected shape {list(shape)})")
            file = files.file_of(key)
            if file not in by_file:
                by_file[file] = tensor_locations(file)
            return _located(by_file[file], key, shape, file)

        pieces = {}
        for i in layers:
            p = moe_prefix(files, i, family) + ".experts"
            if p + ".gate_up_proj" in files:
                gate_up, down = loc(p + ".gate_up_proj", (E, 2 * f, d)), loc(p + ".down_proj", (E, d, f))
                pieces[i] = ("fused", gate_up, down)
            else:
                shapes = ((f, d), (f, d), (d, f))
                pieces[i] = ("split", [[loc(f"{p}.{e}.{name}.weight", s) for name, s in zip(family.expert_names, shapes)]
                                       for e in range(E)])

        def locate(i: int, e: int):
            kind, *where = pieces[i]
            if kind == "fused":
                gate_up, down = where
                return (gate_up, e, (0, f), True), (gate_up, e, (f, 2 * f), True), (down, e, None, True)
            return tuple((piece, None, None, True) for piece in where[0][e])

        return cls(locate, layers, E, d, f, dtype)


def _moe_layers(config: ModelConfig) -> list[int]:
    return [i for i in range(config.n_layers) if config.is_moe_layer(i)]


def _located(locs: dict[str, TensorLocation], name: str, shape: tuple[int, ...], file: Path) -> TensorLocation:
    loc = locs.get(name)
    if loc is None:
        raise ValueError(f"{file}: missing {name} (expected shape {list(shape)})")
    if loc.shape != tuple(shape) or not loc.dtype.is_floating_point:
        raise ValueError(f"{file}: {name} is {loc.dtype} {list(loc.shape)}, expected a float tensor of shape "
                         f"{list(shape)}")
    return loc


def check_offloadable(config: ModelConfig, where: str | Path) -> None:
    """Raise ValueError unless ``config``'s routed experts can be offloaded."""
    if not _moe_layers(config):
        raise ValueError(f"{where} is a dense model: it has no routed experts to offload")
    if config.moe.weight_format is not None:
        raise ValueError(f"{where} holds its experts as {config.moe.weight_format}; expert offloading reads float "
                         "experts: offload the model it was quantized from")
    if config.moe.expert != "swiglu":
        raise ValueError(f"{where} has {config.moe.expert!r} experts; expert offloading reads SwiGLU experts")
