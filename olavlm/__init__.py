# olavlm: the OLA-VLM model, data, teachers and training engine (built on olakernels).
__version__ = "0.1.0"
