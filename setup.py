"""Builds the runtime's optional C kernels; everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled (no C compiler), the package still
installs and the runtime says that it runs its slower numpy fallback.

It is built with the hardening flags a distribution would use (stack protector and
stack-clash protection, fortified libc calls, CET on x86, full RELRO), each only where
the compiler accepts it, so that an older or different compiler still builds it.
"""

import os
import platform
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPTIMIZE = ["-O3", "-std=c11", "-pthread"]
HARDENING_COMPILE = [
    "-fstack-protector-strong",
    "-fstack-clash-protection",
    # Python's own CFLAGS may define it already (with another level): undefine first.
    ("-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2"),
    "-fcf-protection",  # x86 only; other targets reject it, and the probe drops it
    "-Wformat",
    "-Werror=format-security",
]
HARDENING_LINK = ["-Wl,-z,relro,-z,now", "-Wl,-z,noexecstack"]


class HardenedBuildExt(build_ext):
    """Adds each hardening flag the compiler accepts (a probe compile and link per flag)."""

    def _accepts(self, flags: list[str], link: bool) -> bool:
        from setuptools.errors import CCompilerError, CompileError, LinkError

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(
                    "#include <string.h>\nint probe(char *d, const char *s)"
                    " { strcpy(d, s); return (int)strlen(d); }\n"
                )
            try:
                # -Werror: compilers that only warn about an unknown flag (clang) refuse it.
                objs = self.compiler.compile(
                    [src],
                    output_dir=tmp,
                    extra_postargs=["-O2", "-Werror", *([] if link else flags)],
                )
                if link:
                    self.compiler.link_shared_object(
                        objs, os.path.join(tmp, "probe.so"), extra_postargs=flags
                    )
            except (CCompilerError, CompileError, LinkError, OSError):
                return False
        return True

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            compile_flags: list[str] = []
            for f in HARDENING_COMPILE:
                group = list(f) if isinstance(f, tuple) else [f]
                if self._accepts(group, link=False):
                    compile_flags += group
            link_flags = [f for f in HARDENING_LINK if self._accepts([f], link=True)]
            for ext in self.extensions:
                ext.extra_compile_args = ext.extra_compile_args + compile_flags
                ext.extra_link_args = ext.extra_link_args + link_flags
            if compile_flags or link_flags:
                print(
                    f"signgrad kernels on {platform.machine()}: hardening "
                    f"{' '.join(compile_flags + link_flags)}"
                )
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "signgrad.runtime._kernels",
            ["signgrad/runtime/_kernels.c"],
            depends=[
                "signgrad/runtime/_kernels_core.h",
                "signgrad/runtime/_kernels_impl.h",
                "signgrad/runtime/_net.h",
            ],
            extra_compile_args=OPTIMIZE,
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": HardenedBuildExt},
)
