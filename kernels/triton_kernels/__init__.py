"""Triton kernels. Shipped inside the package as ``fastattr.triton_kernels`` (see pyproject.toml).

Importing this package needs triton; the ops import the kernel modules lazily so that fastattr
itself imports without triton.
"""
