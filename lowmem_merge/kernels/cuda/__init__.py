"""Optional CUDA kernels (numba-cuda). Import submodules explicitly: importing this
package must not import numba.cuda, which users without numba-cuda lack."""
