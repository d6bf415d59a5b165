# Direct W4A4 QAT baseline (paper appendix A.4) for the tiny demo DeiT: the GPLQ
# stage-1 config next to it with the weights fake-quantized too (4 bit per
# output channel on the folded weight W diag(s), LSQ-learned), everything else
# identical (calibration, mimicking, optimiser, one epoch).
_base_ = './gplq_deit-tiny_fashionmnist_w32a4.py'

model = dict(quant=dict(weight=dict(bits=4, learnable=True)))
