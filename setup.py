import os.path as osp

from setuptools import find_packages, setup


def read_version() -> str:
    ns: dict = {}
    with open(osp.join(osp.dirname(__file__), 'gplq_mm', 'version.py')) as f:
        exec(f.read(), ns)
    return ns['__version__']


setup(
    name='gplq_mm',
    version=read_version(),
    description='GPLQ: activation-first, weights-later W4A4 quantization for '
    'vision transformers in mmdet and mmpretrain',
    long_description=open('README.md').read() if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['gplq_mm', 'gplq_mm.*']),
    python_requires='>=3.11,<3.12',
    # Tested versions (README); tools/install.sh installs exactly these, building mmcv's
    # compiled ops for this torch.  torch is pinned: a bare requirement can pull a
    # multi-GB CUDA build.
    install_requires=[
        'torch==2.14.1',
        'torchvision==0.29.1',
        'numpy>=1.24,<2',
        'mmengine>=0.10.4,<0.11',
        'mmcv>=2.1.0,<2.2.0',
        'mmdet==3.3.0',
        'mmpretrain==1.2.0',
        'matplotlib',
    ],
    extras_require={
        'tests': ['pytest>=7'],
        # ONNX export (tools/export_onnx.py: INT4 needs opset 21) and its
        # check in onnxruntime.  Pinned beside numpy 1.26: an unpinned onnx
        # pulls numpy 2 through ml_dtypes 0.7 and breaks the mm* stack.
        'deploy': ['onnx==1.23.2', 'onnxruntime==1.32.0', 'ml_dtypes==0.5.4'],
        # the real pretrained demo: DINOv2 weights are read from an ONNX file
        # (onnx; onnxruntime checks the conversion), downstream linear probes
        # (scikit-learn).
        'demo': ['onnx==1.23.2', 'onnxruntime==1.32.0', 'ml_dtypes==0.5.4',
                 'scikit-learn==1.5.2'],
    },
    zip_safe=False,
)
