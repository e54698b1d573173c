//! The `Audit` service: queries over the gateway's audit trail.

use aviary::pb::admin::{
    AuditQuery, AuditRecords,
    audit_server::{Audit as AuditApi, AuditServer},
};
use tonic::{Request, Response, Status};

use crate::audit::{Audit, Filter, Kind};

/// The most records one query returns when it names no limit.
const DEFAULT_LIMIT: usize = 100;

/// The most records one query may ask for.
const MAX_LIMIT: usize = 100_000;

/// The `Audit` service over a gateway's trail.
#[derive(Debug, Clone)]
pub struct AuditService {
    audit: Audit,
}

impl AuditService {
    /// The service, ready to add to a server.
    pub fn server(audit: Audit) -> AuditServer<AuditService> {
        AuditServer::new(AuditService { audit })
    }
}

/// The filter and limit `query` asks for, or INVALID_ARGUMENT naming the field.
pub fn filter_of(query: AuditQuery) -> Result<(Filter, usize), Status> {
    let kinds = query
        .kinds
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Kind::parse(name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "kinds[{i}]: \"{name}\" is not a kind (call, route, model, rollout, config, prediction, data)"
                ))
            })
        })
        .collect::<Result<Vec<Kind>, Status>>()?;
    let limit = match query.limit as usize {
        0 => DEFAULT_LIMIT,
        n if n > MAX_LIMIT => {
            return Err(Status::invalid_argument(format!(
                "limit: {n} is more than {MAX_LIMIT}"
            )));
        }
        n => n,
    };
    let given = |s: String| Some(s).filter(|s| !s.is_empty());
    Ok((
        Filter {
            kinds,
            model: given(query.model),
            version: given(query.version),
            actor: given(query.actor),
            since_ms: Some(query.since_ms).filter(|&t| t > 0),
        },
        limit,
    ))
}

#[tonic::async_trait]
impl AuditApi for AuditService {
    async fn query_audit(
        &self,
        request: Request<AuditQuery>,
    ) -> Result<Response<AuditRecords>, Status> {
        let (filter, limit) = filter_of(request.into_inner())?;
        let (records, truncated) = self.audit.query(filter, limit).await?;
        Ok(Response::new(AuditRecords { records, truncated }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_names_the_field_it_gets_wrong() {
        let bad_kind = filter_of(AuditQuery {
            kinds: vec!["route".into(), "weights".into()],
            ..AuditQuery::default()
        })
        .expect_err("unknown kind");
        assert!(
            bad_kind.message().starts_with("kinds[1]: \"weights\""),
            "{bad_kind:?}"
        );
        let too_many = filter_of(AuditQuery {
            limit: 1_000_000,
            ..AuditQuery::default()
        })
        .expect_err("too many");
        assert!(too_many.message().starts_with("limit:"), "{too_many:?}");
        let (filter, limit) = filter_of(AuditQuery {
            model: "demo".into(),
            ..AuditQuery::default()
        })
        .expect("valid");
        assert_eq!(
            (filter.model.as_deref(), filter.actor, limit),
            (Some("demo"), None, DEFAULT_LIMIT)
        );
    }
}
