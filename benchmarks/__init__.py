"""asv benchmark suites of normkit (see README.md here); ``compare.py`` is a
stand-alone script, not an asv suite."""
