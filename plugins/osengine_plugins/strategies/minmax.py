"""MinMax: no migration; the recipe's observers alone set the quantization ranges (the baseline)."""
from osengine.plugin_api import Strategy


class MinMax(Strategy):
    name = "minmax"
    description = "no migration (plain MinMax ranges): the baseline"
    distributed = True   # channel_min / channel_max and the weights only

    def migrate(self, data):
        return None
