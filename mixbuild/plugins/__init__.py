"""MoE kernels (Triton), their torch custom-op bindings, and the TensorRT plugin definitions.

Shape legend used throughout this package:

    T  tokens            E  experts          k  experts per token (top-k)
    H  hidden size       I  intermediate size (per expert)
    S  token-slots = T * k  (slot s belongs to token s // k, choice s % k)

Modules (heavy dependencies are imported lazily, so ``import mixbuild.plugins`` needs only torch):

    formats         quantized weight layouts (FP8 W8A8, INT4 W4A16) and their torch references
    problem         validation of MoEExperts inputs against those layouts
    align           moe_align: group token-slots by expert, padded to the kernel's block size
    configs         tuned kernel parameters as data (JSON keyed by shape, device and dtype)
    dispatch        moe_gate_triton, moe_experts_triton, register_cuda_kernels
    triton_kernels  the @triton.jit kernels (imports triton)
    trt_plugins     TensorRT / TensorRT-RTX plugins for MoEGate and MoEExperts (trt_classes
                    holds the IPluginV3 classes, built per TensorRT module)
    timing          CUDA-graph timing shared by the benchmark and the tuner
"""
