//! Who may do what: Cedar policies and roles ([`authz`]), rate limits and
//! quotas ([`limits`]), and the resources the authorizer judges ([`resource`]).

pub mod authz;
pub mod limits;
pub mod resource;
