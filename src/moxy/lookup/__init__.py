"""DomainDB: where a recipient's mail goes. Sources map lookup keys to destination groups."""
