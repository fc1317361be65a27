"""CT organ segmentation: dataset preparation, distributed 3-D U-Net training, inference.

Modules: ``dataset`` and ``dicom`` (ct-prepare), ``unet``, ``loss``, ``sampler``,
``augment`` with its kernels ``augment_{cpu,cuda}``, ``planner``, ``distributed``,
``train`` (ct-train), ``inference`` and ``segment`` (ct-segment). PyTorch is
needed by ``unet``, ``loss``, ``distributed``, ``train``, ``inference`` and ``segment`` only.
"""
