# Direct W4A4 QAT baseline (paper appendix A.4) for the DINOv2 ViT-S/14
# Fashion-MNIST classifier: the GPLQ stage-1 config next to it with the weights
# fake-quantized too (4 bit per output channel, LSQ-learned), everything else
# identical (calibration, mimicking, optimiser, one epoch).
_base_ = './gplq_dinov2-s_fashionmnist_w32a4.py'

model = dict(quant=dict(weight=dict(bits=4, learnable=True)))
