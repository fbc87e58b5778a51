"""The command line's jobs: check, bench, train and the demo model. The library core never imports this package."""  # noqa: E501
