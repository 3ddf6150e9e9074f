"""Fast tier: every format's file computes in onnx's own reference implementation
(``onnx.reference.ReferenceEvaluator``) exactly what onnxruntime computes, for every deployable
quantizer kind, on the tiny ViT. The ``ort`` file's one ``com.microsoft`` kernel,
MatMulIntegerToFloat, runs as its specification says (below); everything else is standard ONNX."""

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from vitq_onnx import runtime
from vitq_onnx.calibration.bits import BitWidths
from vitq_onnx.calibration.calibrate import calibrate
from vitq_onnx.calibration.methods import get_method
from vitq_onnx.calibration.state import CalibOptions
from vitq_onnx.codes.spec import SPECS
from vitq_onnx.fp32 import export_fp32
from vitq_onnx.passes import PassContext, pipeline, run_passes

# (method, bits) -> the activation kinds its recipe uses on the tiny ViT
CASES = {("basic", "3/3"): {"uniform"}, ("repq", "8/8"): {"uniform"}, ("repq", "4/4"): {"uniform", "log2"},
         ("ias-sulq", "4/4"): {"uniform", "sulq"}, ("ias-sulq", "6/6"): {"uniform", "log2-table"}}


def test_the_cases_cover_every_deployable_kind():
    assert set().union(*CASES.values()) == {name for name, spec in SPECS.items() if spec.deployable}


class MatMulIntegerToFloat(OpRun):
    """com.microsoft.MatMulIntegerToFloat: float32(int32 sum of (A - a_zero)(B - b_zero)) times
    a_scale * b_scale, plus the bias."""

    op_domain = "com.microsoft"

    def _run(self, a, b, a_scale, b_scale, a_zero=None, b_zero=None, bias=None):
        a = a.astype(np.int32) - (0 if a_zero is None else a_zero.astype(np.int32))
        b = b.astype(np.int32) - (0 if b_zero is None else b_zero.astype(np.int32))
        out = np.matmul(a, b).astype(np.float32) * (a_scale * b_scale).astype(np.float32)
        return ((out + bias).astype(np.float32) if bias is not None else out,)


@pytest.mark.parametrize("fmt", ["qdq", "openvino", "ort"])
@pytest.mark.parametrize("method, bits", sorted(CASES))
def test_reference_implementation_matches_onnxruntime(method, bits, fmt, tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths.parse(bits), get_method(method), "tiny",
                       CalibOptions(progress=False))
    assert {q.kind for q in recipe.activations.values()} == CASES[(method, bits)]
    fp32 = export_fp32(tiny, 32)
    stored = {i.name for i in fp32.graph.initializer}
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    model = run_passes(fp32, pipeline(recipe, fmt), PassContext(recipe, fmt), progress=False)
    images = tiny_images[8:]
    reference = ReferenceEvaluator(model, new_ops=[MatMulIntegerToFloat]).run(None, {"image": images})[0]
    np.testing.assert_array_equal(reference, runtime.run(runtime.session(model), images))
