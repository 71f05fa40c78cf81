//! axum support (feature `axum`): see the module items.
