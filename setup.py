"""The one compiled piece: rtrain.data._jpeg_region, region decoding with the system's libjpeg-turbo.

Optional: where libjpeg's headers or library are missing (`apt-get install libjpeg62-turbo-dev` provides
them), the build is skipped with a warning and rtrain decodes whole images instead (rtrain.data.decode).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rtrain.data._jpeg_region", ["rtrain/data/_jpeg_region.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], optional=True)])
