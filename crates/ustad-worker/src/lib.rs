//! worker side
