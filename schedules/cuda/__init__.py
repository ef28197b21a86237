"""CUDA schedule templates (kind "cuda"), found by schedules/template.py: conv2d_direct and dense_tiled bind
blockIdx/threadIdx and stage tiles through shared memory; dense_tensorcore (priority over dense_tiled) takes
float16/bfloat16 dense and matmul whose shapes its tiles divide, on tensor cores (mma.sync, ldmatrix, cp.async);
conv2d_tensorcore (priority over conv2d_direct) takes float16/bfloat16 NCHW convs with groups 1 the same way, as
an implicit GEMM; generic (injective groups and reductions) takes every group they do not claim. threads.py holds
the thread-binding steps they share."""
