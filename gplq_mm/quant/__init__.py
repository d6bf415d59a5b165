"""Quantization core: primitives (functional), fused kernels, int4 packing,
observers, thin modules, QwT.

Imports torch only (no mm* package), so it can be used and tested alone.
"""
from .config import QuantConfig, WeightQuantConfig
from .errors import NonFiniteError
from .functional import (choose_qparams, fake_quantize, fake_quantize_log2,
                         fake_quantize_lsq, log2_dequantize, log2_quantize,
                         quantize, search_weight_scale)
from .gptq import gptq_codes
from .int4 import pack_int4, unpack_int4
from .kernels import lsq_conv2d, lsq_linear, quant_attention
from .modules import (IntQConv2d, IntQLinear, QConv2d, QLinear,
                      fold_and_quantize_weight, set_int_gemm,
                      to_integer)
from .observers import (MinMaxObserver, MSEObserver, PercentileObserver,
                        build_observer)
from .quantizer import (ActQuantizer, QState, WeightQuantizer,
                        all_act_calibrated, iter_act_quantizers,
                        iter_weight_quantizers, set_act_state)
from .qwt import QwTFit, QwTSums, fit_qwt, solve_ridge

__all__ = [
    'QuantConfig', 'WeightQuantConfig', 'choose_qparams', 'fake_quantize',
    'fake_quantize_lsq', 'fake_quantize_log2', 'log2_quantize',
    'log2_dequantize', 'lsq_linear', 'lsq_conv2d', 'quant_attention',
    'quantize', 'search_weight_scale', 'gptq_codes',
    'pack_int4', 'unpack_int4', 'QLinear', 'QConv2d', 'IntQLinear',
    'IntQConv2d', 'fold_and_quantize_weight', 'set_int_gemm', 'to_integer', 'MinMaxObserver',
    'MSEObserver',
    'PercentileObserver', 'build_observer', 'ActQuantizer', 'QState',
    'WeightQuantizer', 'iter_act_quantizers', 'iter_weight_quantizers',
    'all_act_calibrated', 'set_act_state', 'QwTSums',
    'QwTFit', 'fit_qwt', 'solve_ridge', 'NonFiniteError'
]
