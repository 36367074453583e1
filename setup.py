"""The one compiled piece: rtrain.data._jpeg_region, region decoding with libjpeg-turbo.

It compiles against libjpeg's headers (`apt-get install libjpeg62-turbo-dev`) and links no libjpeg: at import,
rtrain.data.decode opens the fastest libjpeg-turbo present (the 3.x one inside Pillow's wheel, else the system's
libjpeg.so.62). Optional: where the headers are missing the build is skipped with a warning and rtrain decodes
whole images instead. Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rtrain.data._jpeg_region", ["rtrain/data/_jpeg_region.c"], libraries=["dl"],
                             extra_compile_args=["-O2"], optional=True)])
