"""Test plugins written against the fusionkit 0.1.0 documentation (``docs/writing-a-plugin.md`` and
``docs/distillation.md`` as released), one registration style each, kept as those docs wrote them.

They must keep working through 0.2.x, with a ``DeprecationWarning`` where the style is deprecated, until the
release that removes the style (CHANGELOG.md, "Deprecated"). Do not modernise them: they are the compatibility
promise.
"""
