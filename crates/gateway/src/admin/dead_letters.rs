//! The `DeadLetters` service: list the requests a gateway kept after they finally
//! failed, and send them again through the front once the cause is fixed.

use std::sync::Arc;

use aviary::pb::{
    admin::{
        ListDeadLettersRequest, ListDeadLettersResponse, ReplayDeadLettersRequest,
        ReplayDeadLettersResponse, ReplayOutcome,
        dead_letters_server::{DeadLetters as DeadLettersApi, DeadLettersServer},
    },
    inference::ModelInferRequest,
};
use prost::Message;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{dead_letters::DeadLetters, front::Front};

/// The `DeadLetters` service over a gateway's queue and front.
#[derive(Debug, Clone)]
pub struct DeadLettersService {
    letters: Arc<DeadLetters>,
    front: Front,
}

impl DeadLettersService {
    /// The service, ready to add to a server.
    pub fn server(
        letters: Arc<DeadLetters>,
        front: Front,
    ) -> DeadLettersServer<DeadLettersService> {
        DeadLettersServer::new(DeadLettersService { letters, front })
    }
}

#[tonic::async_trait]
impl DeadLettersApi for DeadLettersService {
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let model = request.into_inner().model;
        let mut letters = self.letters.list(&model)?;
        for letter in &mut letters {
            letter.request.clear();
        }
        let dropped = self.letters.dropped();
        Ok(Response::new(ListDeadLettersResponse {
            letters,
            dropped_oldest: dropped.oldest,
            dropped_busy: dropped.busy,
            redis_stream: self.letters.redis_stream().unwrap_or_default().to_owned(),
            dropped_redis: dropped.redis,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let mut outcomes = Vec::new();
        let mut answered = Vec::new();
        for letter in self.letters.list(&request.model)? {
            let Ok(mut inference) = ModelInferRequest::decode(letter.request.as_slice()) else {
                outcomes.push(ReplayOutcome {
                    id: letter.id,
                    ok: false,
                    detail: "the kept request does not decode".into(),
                });
                continue;
            };
            if !request.version.is_empty() {
                inference.model_version.clone_from(&request.version);
            }
            let outcome = match self.front.infer(&MetadataMap::new(), inference).await {
                Ok(response) => {
                    answered.push(letter.id);
                    ReplayOutcome {
                        id: letter.id,
                        ok: true,
                        detail: format!("answered by version {}", response.model_version),
                    }
                }
                Err(error) => ReplayOutcome {
                    id: letter.id,
                    ok: false,
                    detail: error.status().message().to_owned(),
                },
            };
            outcomes.push(outcome);
        }
        self.letters.remove(&answered)?;
        tracing::info!(
            replayed = outcomes.len(),
            answered = answered.len(),
            "dead letters replayed"
        );
        Ok(Response::new(ReplayDeadLettersResponse { outcomes }))
    }
}
