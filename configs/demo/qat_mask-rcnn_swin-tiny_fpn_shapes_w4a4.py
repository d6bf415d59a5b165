# Direct W4A4 QAT baseline (paper appendix A.4) for the tiny demo detector:
# identical to the GPLQ stage-1 config next to it (same quantizer placement,
# calibration, optimiser, one epoch), except that the weights are
# fake-quantized too, from the start: 4 bit per output channel on the folded
# weight W diag(s), LSQ-learned scales.  Convert the result with
#   python tools/gplq_quantize.py THIS_CONFIG work_dir/epoch_1.pth --method qat --no-qwt ...
_base_ = './gplq_mask-rcnn_swin-tiny_fpn_shapes_w32a4.py'

model = dict(quant=dict(weight=dict(bits=4, learnable=True)))
