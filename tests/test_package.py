import rankwise
from rankwise.core.errors import ConfigError, RankwiseError


def test_error_hierarchy():
    assert issubclass(ConfigError, RankwiseError)
    assert issubclass(ConfigError, ValueError)
    assert rankwise.__version__
