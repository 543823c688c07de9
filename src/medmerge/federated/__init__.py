"""medmerge as a Flower federation: sites keep their questions; the coordinator merges, searches and
evaluates through them (docs/federated.md).

    config.py       FederatedConfig (the experiment) and what each party reads of it
    wire.py         Payload: the only thing that crosses the wire (JSON numbers/recipes + named bytes)
    site.py         what a site does: train, receive adapters, score a recipe, evaluate (its data stays)
    coordinator.py  what the coordinator does: check adapters, federated search, merges, verdict
    apps.py         the Flower ClientApp and ServerApp around site.py / coordinator.py
    launcher.py     `medmerge federate`: SuperLink + one SuperNode per site on 127.0.0.1, TLS, auth
    tls.py          a local CA, the SuperLink's certificate and the SuperNodes' keys
"""
