"""Low-rank + sparse pretraining layers (SLTrain, LOST) and the `rankwise pretrain` recipe."""
from rankwise.pretrain.lost import LOSTLinear, lost_model  # noqa: F401
from rankwise.pretrain.recipe import PretrainConfig, load_run, pretrain  # noqa: F401
from rankwise.pretrain.sltrain import SLTrainLinear, sltrain_model  # noqa: F401
