"""Post-Softmax log2-table quantization in the graph: log-domain codes, table digits, integer attn@v.

Codes as the log2 pass makes them (LogSoftmax, Sub, QuantizeLinear by ln(2)/m, Min with Z); code
k stands for scale * L_k / 2^14 (calibration/quantizers/log2_table.py). A Gather per 7-bit digit
of L_k reads the code's digit from a 2^b-entry uint8 table (in both formats: a table is what
integer hardware uses for it too), and an integer GEMM per digit multiplies it with v's codes;
the high digit's sum is weighted 128 in its float unit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration.quantizers.log2 import log2_log_scale
from ..calibration.quantizers.log2_table import digit_units, table_digits, table_step
from ..naming import tensor_label
from ..recipe import split_key
from .attention_av import attention_matmul, dequantized_v, log_codes, scaled_integer_matmul, sum_parts
from .base import OpBuilder, Pass, PassContext, node_index


class Log2TableSoftmax(Pass):
    """Deploys the recipe's log2-table quantizers at ``keys``."""

    name = "log2_table_softmax"

    def __init__(self, keys: list[str]):
        self.keys = keys

    def run(self, graph: gs.Graph, ctx: PassContext) -> None:
        nodes = node_index(graph)
        for key in self.keys:
            node, softmax = attention_matmul(nodes, key, "log2-table")
            b = OpBuilder(graph, tensor_label(*split_key(key)), sep="_")
            _rewrite(b, node, softmax, ctx.recipe.activations[key], key, ctx.format)


def _rewrite(b: OpBuilder, node: gs.Node, softmax: gs.Node, aq, key: str, fmt: str) -> None:
    scale, m = np.float32(aq.params["scale"].reshape(())), int(aq.params["per_octave"].reshape(()))
    codes = log_codes(b, softmax, log2_log_scale(scale).numpy(), table_step(m).numpy(), 2**aq.bits - 1,
                      "table_codes", "ln_step")
    index = b.op("Cast", "code_index", [codes], dtype=np.int64, to=onnx.TensorProto.INT64)
    v_codes, v_scale, v_zero = dequantized_v(b, node.inputs[1], key)
    sums = []
    for name, digits, unit in zip(("high", "low"), table_digits(aq.bits, m), digit_units(scale, v_scale)):
        digit = b.op("Gather", f"level_{name}", [b.const(f"level_{name}_table", digits.numpy(), np.uint8), index],
                     dtype=np.uint8, axis=0)
        sums.append(scaled_integer_matmul(b, name, digit, v_codes, v_zero, unit.numpy(), fmt))
    sum_parts(b, node, sums)
