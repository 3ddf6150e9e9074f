"""Fast tier: the portable ``qdq`` file computes in onnx's own reference implementation
(``onnx.reference.ReferenceEvaluator``) exactly what onnxruntime computes, for every deployable
quantizer kind, on the tiny ViT. (The ``ort`` file uses onnxruntime's ``com.microsoft`` integer
kernels, which the reference does not implement.)"""

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

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


@pytest.mark.parametrize("method, bits", sorted(CASES))
def test_reference_implementation_matches_onnxruntime_on_the_qdq_file(method, bits, tiny, tiny_images):
    recipe = calibrate(tiny, tiny_images[:8], BitWidths.parse(bits), get_method(method), "tiny",
                       CalibOptions(progress=False))
    assert {q.kind for q in recipe.activations.values()} == CASES[(method, bits)]
    fp32 = export_fp32(tiny, 32)
    stored = {i.name for i in fp32.graph.initializer}
    recipe.param_storage = {k: v for k, v in recipe.param_storage.items() if k in stored}
    model = run_passes(fp32, pipeline(recipe, "qdq"), PassContext(recipe, "qdq"), progress=False)
    images = tiny_images[8:]
    reference = ReferenceEvaluator(model).run(None, {"image": images})[0]
    np.testing.assert_array_equal(reference, runtime.run(runtime.session(model), images))
