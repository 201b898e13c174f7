"""
Packaging for wsproxy.

The twistd plugin lives in C{twisted/plugins/}, a namespace that belongs to
Twisted: it must not get an C{__init__.py}, so it is shipped as package data
of the C{twisted} distribution path rather than as a package of our own.
"""

import re

from setuptools import setup

with open("wsproxy/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)

setup(
    name="wsproxy",
    version=VERSION,
    description="A WebSocket-aware HTTP/1.1 reverse proxy on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["wsproxy", "twisted.plugins"],
    package_data={"twisted": ["plugins/wsproxy_plugin.py"], "wsproxy": ["demo.html"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "pyopenssl>=24",
        "service-identity>=24",
        "autobahn>=24",
        "prometheus-client>=0.20",
        # wsproxy-from-nginx and --config nginx.conf: nginx's own grammar.
        "crossplane>=0.5",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "kosoku>=0.1",
            "trustme>=1.1",
            "hypothesis>=6",
            "pyyaml>=6",
        ],
        # wsproxy-conformance: the Autobahn fuzzing client and a throwaway CA.
        "conformance": [
            "kosoku>=0.1",
            "trustme>=1.1",
        ],
    },
    entry_points={
        "console_scripts": [
            "wsproxy-conformance = wsproxy.conformance:main",
            "wsproxy-from-nginx = wsproxy.nginxconf:main",
        ],
    },
)
