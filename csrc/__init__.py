"""C++ and CUDA sources of the native kernels, installed as package data (``sigec.csrc``) so
``sigec.runtime.native`` can build them just in time against the user's torch."""
