"""Hydra SearchPathPlugin (discovered by Hydra in the `hydra_plugins` namespace package): adds the folders of
`SCALETRAIN_CONFIG_PATH` and the `conf/` folder of every scaletrain plugin package to the config search path,
after scaletrain's own tree, so `optim=lion` resolves to a plugin's `conf/optim/lion.yaml`. See
scaletrain/compose.py and scaletrain/plugins.py."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ScaletrainSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from scaletrain.compose import user_config_dirs
        from scaletrain.plugins import plugin_config_dirs

        for path in [*user_config_dirs(), *plugin_config_dirs()]:
            search_path.append(provider="scaletrain-plugin", path=path)
