"""Builds the runtime's optional C kernels; everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled (no C compiler), the package still
installs and the runtime says that it runs its slower numpy fallback.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "signgrad.runtime._kernels",
            ["signgrad/runtime/_kernels.c"],
            depends=["signgrad/runtime/_kernels_impl.h"],
            extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
