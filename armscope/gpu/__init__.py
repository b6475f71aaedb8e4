"""TensorRT and CUDA, imported lazily: one place for the TensorRT import, its logger and
version checks (``trt_env``), the CUDA runtime in both flavours (``cuda_runtime``) and the
keys that say which engine is valid where (``engines``). Used by the runtime to run
engines and by calibration to build them."""
