"""Deployment: ONNX export of W4A4 models.

* :mod:`.onnx_export`: tracing, the lowering of the ``gplq`` placeholder nodes
  into opset-21 INT4 Q/DQ, and the code-for-code check in onnxruntime;
* :mod:`.model_export`: a W4A4 config + checkpoint to an ONNX file (what
  ``tools/export_onnx.py`` runs).

docs/deployment.md says what runs where.  Needs the ``deploy`` extra (onnx,
onnxruntime); nothing here is imported by ``import gplq_mm``.
"""
