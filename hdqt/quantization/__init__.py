"""The quantization engine: formats, quantizers, Hadamard transforms, tiled
integer matmuls, quantized layers, policies, recipes and saturation counts."""
from hdqt.quantization.compact_bn import CompactBatchNorm2d
from hdqt.quantization.convert import (
    QuantizationPlan, UnsupportedLayerError, plan_quantization, policy_from_state_dict, quant_layers, quantize_model,
    reseed_quantizers,
)
from hdqt.quantization.formats import FP4_E2M1, FP8_E4M3, FP8_E5M2, FP134, FloatFormat, IntFormat, LogFormat
from hdqt.quantization.hadamard import HADAMARD_RULES, block_layout, hadamard_transform
from hdqt.quantization.layers import QuantConv2d, QuantLinear
from hdqt.quantization.mask_relu import PackedMaskReLU
from hdqt.quantization.policy import OPERANDS, QuantPolicy
from hdqt.quantization.quantizer import DynamicScaling, NonFiniteError, QTensor, Quantizer, int_quantizer
from hdqt.quantization.recipes import list_recipes, recipe
from hdqt.quantization.runtime import SaturationStats, reset_saturation, saturation_report
from hdqt.quantization.scaling import ExponentBiasScaling, SAWBScaling

__all__ = [
    "ExponentBiasScaling", "FP134", "FP4_E2M1", "FP8_E4M3", "FP8_E5M2", "FloatFormat", "LogFormat", "SAWBScaling",
    "CompactBatchNorm2d", "DynamicScaling", "HADAMARD_RULES", "IntFormat", "NonFiniteError", "OPERANDS",
    "PackedMaskReLU", "QTensor", "QuantConv2d",
    "QuantLinear", "QuantPolicy", "QuantizationPlan", "Quantizer", "SaturationStats", "UnsupportedLayerError",
    "block_layout", "hadamard_transform", "int_quantizer", "list_recipes", "plan_quantization",
    "policy_from_state_dict", "quant_layers", "quantize_model", "recipe", "reseed_quantizers", "reset_saturation",
    "saturation_report",
]
