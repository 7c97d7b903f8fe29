"""The `segment` config section's values (saltjax/sections/options.py)."""

import pytest

from saltjax.sections import options


def test_line_numbers_parse():
  assert options.parse_line_numbers("", "inlines") is None
  assert options.parse_line_numbers("3, 5-7,3", "inlines") == [3, 5, 6, 7]
  with pytest.raises(Exception, match="config.segment.inlines='5-x'"):
    options.parse_line_numbers("5-x", "inlines")
