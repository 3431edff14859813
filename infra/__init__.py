"""Infrastructure files shipped with ClaudeCluster: work-pool base job templates and more.

Installed as ``claudecluster.infra`` so ``claudecluster setup`` finds the templates wherever
the package is installed; see ``infra/README.md``.
"""
