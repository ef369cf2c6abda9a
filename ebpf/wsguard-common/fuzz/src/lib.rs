//! Support for the fuzz targets: the plain reference implementations they compare against.

pub mod proxy_reference;
pub mod reference;
