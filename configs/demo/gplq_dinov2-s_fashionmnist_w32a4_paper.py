# The paper's literal stage-1 recipe on the DINOv2 classifier: activation
# scales initialised at the per-channel min/max (not at the 0.1th/99.9th
# percentiles, our default), everything else as in
# gplq_dinov2-s_fashionmnist_w32a4.py.  Stage 2 of the paper folds the whole
# activation scale into the weights: `tools/gplq_quantize.py ... --fold full`.
# docs/ablation.md compares both on the carved validation split.
_base_ = './gplq_dinov2-s_fashionmnist_w32a4.py'

model = dict(quant=dict(act=dict(observer='minmax')))
