"""Uniform affine codes clamp(round(x/scale) + zero_point, 0, 2^bits - 1): the recipe entry."""

from __future__ import annotations

from ..errors import VitqError
from .spec import KindSpec, register_spec, scalar


@register_spec
class UniformSpec(KindSpec):
    name = "uniform"
    params = ("scale", "zero_point")

    def check(self, key, bits, params):
        super().check(key, bits, params)
        zp = scalar(params["zero_point"])
        if scalar(params["scale"]) <= 0 or zp != round(zp) or not 0 <= zp <= 2**bits - 1:
            raise VitqError(f"{key}: uniform scale must be > 0 and zero point an integer in 0..{2**bits - 1}")
