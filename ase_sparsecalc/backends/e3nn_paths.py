"""Which irrep path each entry of an e3nn weight belongs to.

e3nn stores the weights of ``o3.Linear`` and of tensor products with internal weights as one
flat vector: the blocks of all instructions (paths) concatenated in instruction order, each of
``prod(path_shape)`` entries. A radial MLP that feeds a tensor product with external weights
produces, in its last layer's output columns, the same concatenation. These helpers turn that
layout into :class:`~ase_sparsecalc.backends.base.PathSegment` ranges.
"""

from __future__ import annotations

from math import prod

import torch
from e3nn import o3

from .base import PathSegment, WeightInfo


def _consecutive_segments(
    paths: list[tuple[tuple[int, ...], int, int, int | None]],
) -> tuple[PathSegment, ...]:
    """Lay blocks of the given (path_shape, l_in, l_out, element_axis) end to end."""
    segments, start = [], 0
    for shape, l_in, l_out, axis in paths:
        size = prod(shape)
        segments.append(PathSegment(start, start + size, l_in, l_out, tuple(shape), axis))
        start += size
    return tuple(segments)


def linear_segments(linear: o3.Linear, element_axis: int | None = None) -> tuple[PathSegment, ...]:
    """Segments of an ``o3.Linear`` weight; ``element_axis=0`` when the input is a one-hot."""
    return _consecutive_segments(
        [
            (ins.path_shape, linear.irreps_in[ins.i_in].ir.l, linear.irreps_out[ins.i_out].ir.l, element_axis)
            for ins in linear.instructions
            if ins.i_in != -1  # bias-only instructions live in .bias, not .weight
        ]
    )


def tensor_product_segments(
    tp: o3.TensorProduct, element_input: int | None = None
) -> tuple[PathSegment, ...]:
    """Segments of a tensor product's weights (internal ones, or a radial MLP's output).

    Parameters
    ----------
    tp : e3nn.o3.TensorProduct
    element_input : {1, 2} or None
        Which input of the product is a one-hot of the elements (its multiplicity axis of the
        path shape then indexes elements).
    """
    return _consecutive_segments(
        [
            (
                ins.path_shape,
                tp.irreps_in1[ins.i_in1].ir.l,
                tp.irreps_out[ins.i_out].ir.l,
                element_input - 1 if element_input is not None and len(ins.path_shape) >= 2 else None,
            )
            for ins in tp.instructions
            if ins.has_weight
        ]
    )


def whole_tensor_segment(
    shape: tuple[int, ...],
    l_in: int | None = None,
    l_out: int | None = None,
    element_axis: int | None = None,
) -> tuple[PathSegment, ...]:
    """One segment covering a whole tensor (radial hidden layers, symmetric contractions)."""
    return (PathSegment(0, prod(shape), l_in, l_out, tuple(shape), element_axis),)


def radial_mlp_infos(
    prefix: str,
    mlp: torch.nn.Module,
    tp: o3.TensorProduct,
    layer: int | None,
    module: str,
) -> list[WeightInfo]:
    """Weight infos of a radial MLP feeding ``tp``'s path weights.

    Hidden layers (and layer norms) carry no irrep; the output layer's outputs are ``tp``'s path
    weights, so each range of them maps to one path ``l_in -> l_out``. e3nn's
    ``FullyConnectedNet`` stores a layer as (in, out): the outputs are column ranges. mace's
    ``RadialMLP`` (nonlinear interaction blocks) uses ``torch.nn.Linear``, (out, in): the
    outputs are row ranges, which are contiguous flat ranges.
    """
    infos = []
    torch_linear = {f"{n}.weight" for n, m in mlp.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = [(n, p) for n, p in mlp.named_parameters() if n.endswith("weight")]
    for k, (pname, param) in enumerate(layers):
        shape = tuple(param.shape)
        coordinate, segments = "flat", whole_tensor_segment(shape)
        if k == len(layers) - 1 and pname in torch_linear and shape[0] == tp.weight_numel:
            n_in = shape[1]
            segments = tuple(
                PathSegment(s.start * n_in, s.stop * n_in, s.l_in, s.l_out, (s.stop - s.start, n_in))
                for s in tensor_product_segments(tp)
            )
        elif k == len(layers) - 1 and pname not in torch_linear and shape[-1] == tp.weight_numel:
            coordinate, segments = "column", tensor_product_segments(tp)
        infos.append(
            WeightInfo(
                name=f"{prefix}.{pname}",
                shape=shape,
                layer=layer,
                module=module,
                kind="radial",
                coordinate=coordinate,
                segments=segments,
            )
        )
    return infos
